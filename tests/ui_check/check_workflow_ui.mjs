#!/usr/bin/env node
// Headless check that ComfyUI UI-format workflow JSON files load in the REAL frontend served by a running
// ComfyUI (its bundled comfyui-frontend-package, or another build served with --front-end-root) with no
// missing nodes, no schema (zod) validation alerts, no link fixes and unchanged widgets_values; optionally
// that their saved view is readable (--layout) and that a pack's template cards load (--templates).
//
// Usage:
//   node check_workflow_ui.mjs [--url http://127.0.0.1:8188] [--chromium /usr/bin/chromium]
//        [--timeout 90000] [--json report.json] [--screenshot-dir DIR] [--allow-missing]
//        [--ignore-widgets LoadImage,LoadImageOutput]   (node types whose widgets_values are not compared,
//         e.g. combos the frontend resets because the referenced file is absent on this server)
//        [--layout]            measure each workflow at its saved view (see below)
//        [--templates MODULE]  open the template browser's MODULE category (a custom node folder name) and
//                              load every card: no alert, no error toast, the graph of the file, a thumbnail
//        [--make-thumbnails DIR]  write DIR/<name>.jpg, a small rendering of each workflow's graph
//        workflow1.json [workflow2.json ...]
// Needs: npm install (playwright-core; no browser download: uses Debian's /usr/bin/chromium)
// Exit code: 0 = every check clean, 1 = at least one problem, 2 = usage/infra error.
//
// What is checked per workflow (after `app.loadGraphData(json)` in page context):
//  - missing node types: collected by a temporary frontend extension's `afterConfigureGraph(missingNodeTypes)`
//    hook (the same list the "missing nodes" dialog shows), plus the dialog DOM (.comfy-missing-nodes .node-type)
//  - zod schema / link-fixer problems: toasts raised during load (Comfy.Validation.Workflows is on by default)
//  - widgets_values: re-serialised graph vs. the file, per node id (catches wrong widget order/count,
//    e.g. a forgotten control_after_generate value after a seed)
//  - the API-format prompt the frontend would queue (app.graphToPrompt()), returned in the JSON report
// With --layout, in the 1600x1000 window at the view saved in the file (extra.ds):
//  - every node (title bar included) and every text drawn for it is visible: each sampled point hits the
//    graph canvas or one of the node's own DOM widgets, not the frontend's chrome (tab bar, side bar, menus,
//    Run panel, minimap, zoom controls) and not the window's edge
//  - no title, widget name or text value is cut: the canvas draws each of them verbatim (frontends shorten
//    what does not fit with an ellipsis), inside the node, and a widget's name does not run into its value
//  - every link runs forward (its input lies right of its output) and does not pass behind a node it does
//    not connect (the spline is sampled as the frontend draws it)
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { basename } from 'node:path'
import { chromium } from 'playwright-core'

function parseArgs(argv) {
  const o = { url: 'http://127.0.0.1:8188', chromium: '/usr/bin/chromium', timeout: 90000, json: null,
              screenshotDir: null, allowMissing: false, ignoreWidgets: new Set(), layout: false, templates: null,
              thumbnails: null, files: [] }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--url') o.url = argv[++i]
    else if (a === '--chromium') o.chromium = argv[++i]
    else if (a === '--timeout') o.timeout = Number(argv[++i])
    else if (a === '--json') o.json = argv[++i]
    else if (a === '--screenshot-dir') o.screenshotDir = argv[++i]
    else if (a === '--allow-missing') o.allowMissing = true
    else if (a === '--ignore-widgets') argv[++i].split(',').filter(Boolean).forEach((t) => o.ignoreWidgets.add(t))
    else if (a === '--layout') o.layout = true
    else if (a === '--templates') o.templates = argv[++i]
    else if (a === '--make-thumbnails') o.thumbnails = argv[++i]
    else if (a === '-h' || a === '--help') { console.log(readFileSync(new URL(import.meta.url)).toString().split('\n').slice(1, 40).join('\n')); process.exit(0) }
    else o.files.push(a)
  }
  return o
}

const opts = parseArgs(process.argv.slice(2))
if (!opts.files.length) { console.error('no workflow files given (see --help)'); process.exit(2) }
const u = new URL(opts.url)
if (!['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) { console.error('refusing non-loopback url', opts.url); process.exit(2) }

// ------------------------------------------------------------------------------------ in-page helpers

// Runs in the page: the layout problems of the graph on screen (see the header).
function measureLayout() {
  const app = window.app, lg = window.LiteGraph
  const canvas = app.canvas, el = canvas.canvas, rect = el.getBoundingClientRect()
  const ds = canvas.ds, dpr = window.devicePixelRatio || 1
  const TITLE = lg.NODE_TITLE_HEIGHT ?? 30
  const nodes = app.graph._nodes ?? app.graph.nodes
  const toPage = (x, y) => [rect.left + (x + ds.offset[0]) * ds.scale, rect.top + (y + ds.offset[1]) * ds.scale]
  const problems = []

  // every text the canvas draws in one full frame, in page coordinates
  const texts = []
  const proto = CanvasRenderingContext2D.prototype, fillText = proto.fillText
  proto.fillText = function (text, x, y, ...rest) {
    if (this.canvas === el && typeof text === 'string' && text.trim()) {
      const m = this.getTransform(), w = this.measureText(text).width
      const align = this.textAlign
      const x0 = align === 'right' || align === 'end' ? x - w : align === 'center' ? x - w / 2 : x
      const px = (X, Y) => [rect.left + (m.a * X + m.c * Y + m.e) / dpr, rect.top + (m.b * X + m.d * Y + m.f) / dpr]
      const [l, t] = px(x0, y), [r] = px(x0 + w, y)
      texts.push({ text, left: l, right: r, y: t })
    }
    return fillText.call(this, text, x, y, ...rest)
  }
  try { canvas.setDirty(true, true); canvas.draw(true, true) } finally { proto.fillText = fillText }

  const boxOf = (n) => {   // graph coordinates, title bar included
    const collapsed = n.flags?.collapsed
    return { x: n.pos[0], y: n.pos[1] - TITLE, w: collapsed ? (n._collapsed_width ?? 100) : n.size[0],
             h: collapsed ? TITLE : n.size[1] + TITLE }
  }
  const pageBox = (n) => { const b = boxOf(n), [l, t] = toPage(b.x, b.y), [r, bo] = toPage(b.x + b.w, b.y + b.h); return { l, t, r, b: bo } }
  const ownWidget = (n, hit) => (n.widgets ?? []).some((w) => w.element && (w.element === hit || w.element.contains(hit) || hit.contains(w.element)))
  const visible = (n, x, y) => {
    if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return 'outside the window'
    const hit = document.elementFromPoint(x, y)
    if (!hit || hit === el || ownWidget(n, hit)) return null
    return `${hit.tagName.toLowerCase()}.${String(hit.className?.baseVal ?? hit.className).split(' ').slice(0, 3).join('.')}`
  }
  const label = (n) => `node ${n.id} (${n.type})`

  for (const n of nodes) {
    const b = pageBox(n)
    const mine = texts.filter((t) => t.left >= b.l - 2 && t.left <= b.r && t.y >= b.t - 24 && t.y <= b.b + 2)
    // visibility: a grid over the node and the corners of each of its texts
    const points = []
    for (let y = b.t + 1; y < b.b; y += 8) for (let x = b.l + 1; x < b.r; x += 8) points.push([x, y])
    points.push([b.r - 1, b.t + 1], [b.l + 1, b.b - 1], [b.r - 1, b.b - 1])
    for (const t of mine) points.push([t.left, t.y - 4], [t.right, t.y - 4])
    const covered = new Map()
    for (const [x, y] of points) { const why = visible(n, x, y); if (why) covered.set(why, (covered.get(why) ?? 0) + 1) }
    for (const [why, count] of covered) problems.push(`${label(n)} is hidden at ${count} of ${points.length} points by ${why}`)
    // the title, drawn verbatim inside the title bar
    const title = n.getTitle?.() ?? n.title
    const titleText = mine.find((t) => t.text === title && t.y <= b.t + TITLE * ds.scale)
    if (!titleText) {
      const drawn = mine.filter((t) => t.y <= b.t + TITLE * ds.scale).map((t) => t.text)
      problems.push(`${label(n)}: title "${title}" is cut (drawn: ${JSON.stringify(drawn)})`)
    } else if (titleText.right > b.r + 1) problems.push(`${label(n)}: title "${title}" runs past the node's edge`)
    // canvas-drawn widgets: the name (and a text value) verbatim, inside the node, not running into the value
    for (const w of n.widgets ?? []) {
      if (w.element || w.hidden || w.type === 'custom' || String(w.name).startsWith('$$')) continue
      if (typeof w.computeSize === 'function' && w.computeSize(n.size[0])?.[1] <= 0) continue
      const wy = w.y ?? w.last_y
      if (wy === undefined) continue
      const [, top] = toPage(n.pos[0], n.pos[1] + wy), [, bottom] = toPage(n.pos[0], n.pos[1] + wy + (lg.NODE_WIDGET_HEIGHT ?? 20))
      const row = mine.filter((t) => t.y >= top - 1 && t.y <= bottom + 1)
      const names = new Set([w.label, w.name, String(w.name).replaceAll('_', ' ')].filter(Boolean))
      const nameText = row.find((t) => names.has(t.text))
      if (!nameText) { problems.push(`${label(n)}: widget "${w.label ?? w.name}" has its name cut (drawn: ${JSON.stringify(row.map((t) => t.text))})`); continue }
      if (nameText.right > b.r + 1) problems.push(`${label(n)}: widget "${w.name}" runs past the node's edge`)
      const others = row.filter((t) => t !== nameText)
      if (others.some((t) => t.left < nameText.right + 2 && t.right > nameText.left)) problems.push(`${label(n)}: widget "${w.name}": its name runs into its value`)
      if (typeof w.value === 'string' && w.type !== 'button' && w.value.trim() && !row.some((t) => t.text === w.value))
        problems.push(`${label(n)}: widget "${w.name}" shows its value "${w.value}" cut (drawn: ${JSON.stringify(others.map((t) => t.text))})`)
    }
  }

  // links: forward, and the spline clear of every node it does not connect
  const byId = new Map(nodes.map((n) => [n.id, n]))
  const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links ?? {})
  for (const link of links) {
    if (!link) continue
    const from = byId.get(link.origin_id), to = byId.get(link.target_id)
    if (!from || !to) continue
    const a = from.getConnectionPos(false, link.origin_slot), z = to.getConnectionPos(true, link.target_slot)
    const name = `link ${link.id} (${from.id}:${link.origin_slot} -> ${to.id}:${link.target_slot})`
    if (z[0] < a[0] + 10) { problems.push(`${name} runs backwards (from x=${Math.round(a[0])} to x=${Math.round(z[0])})`); continue }
    if (canvas.links_render_mode !== lg.SPLINE_LINK) continue
    const d = Math.hypot(z[0] - a[0], z[1] - a[1]) * 0.25
    const p1 = [a[0] + d, a[1]], p2 = [z[0] - d, z[1]]
    const behind = new Set()
    for (let i = 1; i < 60; i++) {
      const t = i / 60, s = 1 - t
      const x = s ** 3 * a[0] + 3 * s * s * t * p1[0] + 3 * s * t * t * p2[0] + t ** 3 * z[0]
      const y = s ** 3 * a[1] + 3 * s * s * t * p1[1] + 3 * s * t * t * p2[1] + t ** 3 * z[1]
      for (const n of nodes) {
        if (n === from || n === to) continue
        const b = boxOf(n)
        if (x > b.x + 2 && x < b.x + b.w - 2 && y > b.y + 2 && y < b.y + b.h - 2) behind.add(`${n.id} (${n.type})`)
      }
    }
    if (behind.size) problems.push(`${name} passes behind node ${[...behind].join(', ')}`)
  }
  return { problems, view: { scale: ds.scale, offset: [...ds.offset] }, canvasRect: [rect.left, rect.top, rect.width, rect.height] }
}

// Runs in the page: a small rendering of the whole graph as a JPEG data URL.
function renderThumbnail({ size, caption }) {
  const app = window.app, canvas = app.canvas, el = canvas.canvas
  const nodes = app.graph._nodes ?? app.graph.nodes
  const TITLE = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30
  let l = Infinity, t = Infinity, r = -Infinity, b = -Infinity
  for (const n of nodes) { l = Math.min(l, n.pos[0]); t = Math.min(t, n.pos[1] - TITLE - 20); r = Math.max(r, n.pos[0] + n.size[0]); b = Math.max(b, n.pos[1] + n.size[1]) }
  const margin = 30, W = el.width, H = el.height
  const scale = Math.min(W / (r - l + 2 * margin), H / (b - t + 2 * margin))
  canvas.ds.scale = scale
  canvas.ds.offset = [(W / scale - (r - l)) / 2 - l, (H / scale - (b - t)) / 2 - t]
  const showInfo = canvas.show_info
  canvas.show_info = false   // no frame statistics in the picture
  try { canvas.setDirty(true, true); canvas.draw(true, true) } finally { canvas.show_info = showInfo }
  const out = document.createElement('canvas'); out.width = out.height = size
  const ctx = out.getContext('2d')
  ctx.fillStyle = '#202020'; ctx.fillRect(0, 0, size, size)
  const band = Math.round(size * 0.2)
  const k = Math.min(size / W, (size - band) / H)
  ctx.drawImage(el, (size - W * k) / 2, (size - band - H * k) / 2, W * k, H * k)
  ctx.fillStyle = '#2b5fa8'; ctx.fillRect(0, size - band, size, band)
  ctx.fillStyle = '#ffffff'; ctx.textAlign = 'center'; ctx.textBaseline = 'middle'
  ctx.font = `bold ${Math.round(band * 0.3)}px sans-serif`; ctx.fillText('Step1X-Edit', size / 2, size - band * 0.68)
  ctx.font = `${Math.round(band * 0.26)}px sans-serif`; ctx.fillText(caption, size / 2, size - band * 0.3)
  return out.toDataURL('image/jpeg', 0.82)
}

async function closeOverlays(page) {
  await page.keyboard.press('Escape').catch(() => {})
  await page.evaluate(() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach((b) => b.click()))
  await page.waitForTimeout(300)
}

const toastsOf = (page) => page.evaluate(() => [...document.querySelectorAll('.p-toast-message')].map((e) => e.innerText.replace(/\s+/g, ' ').trim()))

// ------------------------------------------------------------------------------------------- the run

const browser = await chromium.launch({
  executablePath: opts.chromium,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
})
let exitCode = 0
const report = []
let frontendVersion = null
const templateReport = []
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } })
  // Block every request that is not to the ComfyUI server (the frontend may try CDN/registry hosts).
  await page.route('**/*', (route) => {
    const r = new URL(route.request().url())
    if (r.host === u.host || r.protocol === 'data:' || r.protocol === 'blob:') return route.continue()
    return route.abort()
  })
  const consoleMsgs = []
  const alerts = []
  page.on('console', (m) => { if (['error', 'warning'].includes(m.type())) consoleMsgs.push(`[${m.type()}] ${m.text()}`) })
  page.on('pageerror', (e) => consoleMsgs.push(`[pageerror] ${e.message}`))
  page.on('dialog', (d) => { alerts.push(`${d.type()}: ${d.message()}`); d.dismiss().catch(() => {}) })

  const t0 = Date.now()
  await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: opts.timeout })
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types
      && Object.keys(window.LiteGraph.registered_node_types).length > 50, null, { timeout: opts.timeout })
  const bootMs = Date.now() - t0
  const nodeTypeCount = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types).length)
  frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null)
  console.log(`frontend ${frontendVersion} ready in ${bootMs} ms, ${nodeTypeCount} node types registered`)
  await page.waitForTimeout(1500)   // let the first-run template browser and the menus settle

  await page.evaluate(() => {
    window.__uicheck = { missing: null }
    window.app.registerExtension({
      name: 'uicheck.capture',
      async afterConfigureGraph(missingNodeTypes) {
        window.__uicheck.missing = JSON.parse(JSON.stringify(missingNodeTypes ?? []))
      },
    })
  })

  for (const file of opts.files) {
    const wf = JSON.parse(readFileSync(file, 'utf8'))
    consoleMsgs.length = 0
    alerts.length = 0
    // close whatever dialog / toasts are open from a previous file or the first-run template browser
    await closeOverlays(page)

    const res = await page.evaluate(async (wfJson) => {
      window.__uicheck.missing = null
      let loadError = null
      try {
        await window.app.loadGraphData(JSON.parse(wfJson), true, true, null,
          { showMissingNodesDialog: true, showMissingModelsDialog: false })
      } catch (e) { loadError = String(e?.stack || e) }
      await new Promise((r) => setTimeout(r, 800))   // let dialogs / toasts render
      const ser = window.app.graph.serialize()
      let apiPrompt = null, apiError = null
      try { apiPrompt = (await window.app.graphToPrompt()).output } catch (e) { apiError = String(e) }
      return {
        loadError,
        missingFromHook: window.__uicheck.missing,
        missingDialog: [...document.querySelectorAll('.comfy-missing-nodes .node-type')].map((e) => e.textContent.trim()),
        toasts: [...document.querySelectorAll('.p-toast-message')].map((e) => e.innerText.replace(/\s+/g, ' ').trim()),
        serialized: { version: ser.version, nodes: ser.nodes.map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values ?? null })),
                      links: ser.links?.length ?? null },
        apiPrompt, apiError,
      }
    }, JSON.stringify(wf))

    // widgets_values comparison by node id (only for nodes whose file entry has widgets_values)
    const after = new Map(res.serialized.nodes.map((n) => [String(n.id), n]))
    const widgetDiffs = []
    for (const n of wf.nodes ?? []) {
      if (!('widgets_values' in n) || opts.ignoreWidgets.has(n.type)) continue
      const a = after.get(String(n.id))
      if (!a) { widgetDiffs.push({ id: n.id, type: n.type, problem: 'node gone after load' }); continue }
      if (JSON.stringify(a.widgets_values ?? []) !== JSON.stringify(n.widgets_values ?? []))
        widgetDiffs.push({ id: n.id, type: n.type, file: n.widgets_values, loaded: a.widgets_values })
    }
    const missing = [...new Set([...(res.missingFromHook ?? []).map((m) => (typeof m === 'string' ? m : m.type)), ...res.missingDialog])]
    const problems = []
    if (res.loadError) problems.push(`loadGraphData threw: ${res.loadError}`)
    if (res.missingFromHook === null) problems.push('afterConfigureGraph hook did not fire (graph not configured)')
    if (missing.length && !opts.allowMissing) problems.push(`missing node types: ${missing.join(', ')}`)
    for (const t of res.toasts) problems.push(`toast: ${t}`)
    for (const a of alerts) problems.push(`alert: ${a}`)
    for (const d of widgetDiffs) problems.push(`widgets_values changed on node ${d.id} (${d.type}): ${JSON.stringify(d.file)} -> ${JSON.stringify(d.loaded)}`)
    if (res.apiError) problems.push(`graphToPrompt failed: ${res.apiError}`)

    let layout = null
    if (opts.layout) {
      await closeOverlays(page)
      // the view saved in the file, as a user opening it sees it
      await page.evaluate((ds) => { if (ds) { window.app.canvas.ds.scale = ds.scale; window.app.canvas.ds.offset = [...ds.offset] } },
                          wf.extra?.ds ?? null)
      await page.waitForTimeout(300)
      layout = await page.evaluate(measureLayout)
      for (const p of layout.problems) problems.push(`layout: ${p}`)
    }

    if (opts.screenshotDir) {
      mkdirSync(opts.screenshotDir, { recursive: true })
      await page.screenshot({ path: `${opts.screenshotDir}/${basename(file, '.json')}.png` })
    }
    if (opts.thumbnails) {
      mkdirSync(opts.thumbnails, { recursive: true })
      const caption = basename(file, '.json').replace(/^step1x_/, '').replaceAll('_', ' ')
      const url = await page.evaluate(renderThumbnail, { size: 384, caption })
      writeFileSync(`${opts.thumbnails}/${basename(file, '.json')}.jpg`, Buffer.from(url.split(',')[1], 'base64'))
    }
    const entry = { file, ok: problems.length === 0, problems, missing, toasts: res.toasts, widgetDiffs,
                    apiPrompt: res.apiPrompt, layout, console: [...consoleMsgs] }
    report.push(entry)
    console.log(`${entry.ok ? 'OK  ' : 'FAIL'} ${file}`)
    for (const p of problems) console.log(`     - ${p}`)
    if (!entry.ok) exitCode = 1
  }

  if (opts.templates) {
    // the template browser: the module's category lists one card per file; each loads without an alert
    const expected = new Map(opts.files.map((f) => [basename(f, '.json'), JSON.parse(readFileSync(f, 'utf8'))]))
    const listed = await page.evaluate(async () => (await (await fetch('/api/workflow_templates')).json()))
    const names = listed[opts.templates] ?? []
    const problems = []
    const extra = names.filter((n) => !expected.has(n)), absent = [...expected.keys()].filter((n) => !names.includes(n))
    if (extra.length) problems.push(`the server lists templates that were not given to check: ${extra.join(', ')}`)
    if (absent.length) problems.push(`the server does not list: ${absent.join(', ')}`)
    const thumbnails = {}
    page.on('response', (r) => { const m = r.url().match(/\/workflow_templates\/[^/]+\/([^/]+)\.jpg$/); if (m) thumbnails[decodeURIComponent(m[1])] = r.status() })
    for (const name of names) {
      alerts.length = 0
      await closeOverlays(page)
      await page.evaluate(() => window.app.graph.clear())   // so that only a loaded template fills the graph
      await page.evaluate(async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates') })
      const category = page.locator('[role=dialog], .p-dialog').getByText(opts.templates, { exact: true }).first()
      await category.waitFor({ timeout: opts.timeout })
      await page.waitForTimeout(500)   // the dialog's opening animation
      await category.click({ timeout: 10000 }).catch(() => category.dispatchEvent('click'))
      const card = page.locator(`[data-testid="template-workflow-${name}"]`)
      await card.waitFor({ timeout: opts.timeout })
      // cards below the fold load their thumbnail lazily: bring the card into view and give the image time to decode
      await card.scrollIntoViewIfNeeded({ timeout: 10000 }).catch(() => {})
      await card.evaluate((c) => new Promise((done) => {
        const i = c.querySelector('img')
        if (!i || (i.complete && i.naturalWidth > 0)) return done()
        const stop = setTimeout(done, 5000)
        i.addEventListener('load', () => { clearTimeout(stop); done() }, { once: true })
        i.addEventListener('error', () => { clearTimeout(stop); done() }, { once: true })
      })).catch(() => {})
      await page.waitForTimeout(300)
      const image = await card.evaluate((c) => { const i = c.querySelector('img'); return i ? { src: i.src, width: i.naturalWidth } : null })
      await card.click({ timeout: 10000 }).catch(() => card.dispatchEvent('click'))
      await page.waitForTimeout(1500)
      const loaded = await page.evaluate(() => window.app.graph.serialize().nodes.map((n) => [n.id, n.type, n.widgets_values ?? []]))
      const toasts = await toastsOf(page)
      const wf = expected.get(name)
      const entryProblems = []
      for (const a of alerts) entryProblems.push(`alert: ${a}`)
      for (const t of toasts) entryProblems.push(`toast: ${t}`)
      if (wf && !Array.isArray(wf.nodes)) entryProblems.push(`${name}.json is not a UI workflow (no nodes list): the template browser cannot open it`)
      if (!loaded.length) entryProblems.push('clicking the card loaded no graph')
      const key = (nodes) => JSON.stringify(nodes.map((n) => JSON.stringify(n)).sort())
      if (wf && key(loaded) !== key((wf.nodes ?? []).map((n) => [n.id, n.type, n.widgets_values ?? []])))
        entryProblems.push(`the loaded graph is not ${name}.json: ${JSON.stringify(loaded).slice(0, 300)}`)
      if (thumbnails[name] !== 200) entryProblems.push(`thumbnail ${name}.jpg answered ${thumbnails[name] ?? 'nothing'}`)
      else if (image && image.width === 0) entryProblems.push(`thumbnail ${name}.jpg did not render`)
      templateReport.push({ name, ok: entryProblems.length === 0, problems: entryProblems, thumbnail: image })
      console.log(`${entryProblems.length ? 'FAIL' : 'OK  '} template ${opts.templates}/${name}`)
      for (const p of entryProblems) console.log(`     - ${p}`)
      problems.push(...entryProblems.map((p) => `${name}: ${p}`))
    }
    if (!names.length) problems.push(`no templates listed for ${opts.templates}`)
    if (problems.length) exitCode = 1
    templateReport.push({ name: '(category)', ok: problems.length === 0, problems })
  }
} catch (e) {
  console.error('infrastructure error:', e)
  exitCode = 2
} finally {
  await browser.close()
}
if (opts.json) writeFileSync(opts.json, JSON.stringify({ frontendVersion, workflows: report, templates: templateReport }, null, 1))
process.exit(exitCode)
