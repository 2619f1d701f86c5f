#!/usr/bin/env node
// Headless check that ComfyUI UI-format workflow JSON files load in the REAL bundled frontend
// (comfyui-frontend-package served by a running ComfyUI) with no missing nodes, no schema
// (zod) validation alerts, no link fixes and unchanged widgets_values.
//
// Usage:
//   node check_workflow_ui.mjs [--url http://127.0.0.1:8188] [--chromium /usr/bin/chromium]
//        [--timeout 90000] [--json report.json] [--screenshot-dir DIR] [--allow-missing]
//        [--ignore-widgets LoadImage,LoadImageOutput]   (node types whose widgets_values are not compared,
//         e.g. combos the frontend resets because the referenced file is absent on this server)
//        workflow1.json [workflow2.json ...]
// Needs: npm i playwright-core   (no browser download: uses Debian's /usr/bin/chromium)
// Exit code: 0 = every workflow clean, 1 = at least one problem, 2 = usage/infra error.
//
// What is checked per workflow (after `app.loadGraphData(json)` in page context):
//  - missing node types: collected by a temporary frontend extension's `afterConfigureGraph(missingNodeTypes)`
//    hook (the same list the "missing nodes" dialog shows), plus the dialog DOM (.comfy-missing-nodes .node-type)
//  - zod schema / link-fixer problems: toasts raised during load (Comfy.Validation.Workflows is on by default)
//  - widgets_values: re-serialised graph vs. the file, per node id (catches wrong widget order/count,
//    e.g. a forgotten control_after_generate value after a seed)
//  - the API-format prompt the frontend would queue (app.graphToPrompt()), returned in the JSON report
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs'
import { basename } from 'node:path'
import { chromium } from 'playwright-core'

function parseArgs(argv) {
  const o = { url: 'http://127.0.0.1:8188', chromium: '/usr/bin/chromium', timeout: 90000, json: null,
              screenshotDir: null, allowMissing: false, ignoreWidgets: new Set(), files: [] }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--url') o.url = argv[++i]
    else if (a === '--chromium') o.chromium = argv[++i]
    else if (a === '--timeout') o.timeout = Number(argv[++i])
    else if (a === '--json') o.json = argv[++i]
    else if (a === '--screenshot-dir') o.screenshotDir = argv[++i]
    else if (a === '--allow-missing') o.allowMissing = true
    else if (a === '--ignore-widgets') argv[++i].split(',').filter(Boolean).forEach((t) => o.ignoreWidgets.add(t))
    else if (a === '-h' || a === '--help') { console.log(readFileSync(new URL(import.meta.url)).toString().split('\n').slice(1, 23).join('\n')); process.exit(0) }
    else o.files.push(a)
  }
  return o
}

const opts = parseArgs(process.argv.slice(2))
if (!opts.files.length) { console.error('no workflow files given (see --help)'); process.exit(2) }
const u = new URL(opts.url)
if (!['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) { console.error('refusing non-loopback url', opts.url); process.exit(2) }

const browser = await chromium.launch({
  executablePath: opts.chromium,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
})
let exitCode = 0
const report = []
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } })
  // Block every request that is not to the ComfyUI server (the frontend may try CDN/registry hosts).
  await page.route('**/*', (route) => {
    const r = new URL(route.request().url())
    if (r.host === u.host || r.protocol === 'data:' || r.protocol === 'blob:') return route.continue()
    return route.abort()
  })
  const consoleMsgs = []
  page.on('console', (m) => { if (['error', 'warning'].includes(m.type())) consoleMsgs.push(`[${m.type()}] ${m.text()}`) })
  page.on('pageerror', (e) => consoleMsgs.push(`[pageerror] ${e.message}`))

  const t0 = Date.now()
  await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: opts.timeout })
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types
      && Object.keys(window.LiteGraph.registered_node_types).length > 50, null, { timeout: opts.timeout })
  const bootMs = Date.now() - t0
  const nodeTypeCount = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types).length)
  console.log(`frontend ready in ${bootMs} ms, ${nodeTypeCount} node types registered`)

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
    // close whatever dialog / toasts are open from a previous file or the first-run template browser
    await page.keyboard.press('Escape').catch(() => {})
    await page.evaluate(() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach((b) => b.click()))
    await page.waitForTimeout(300)

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
    for (const d of widgetDiffs) problems.push(`widgets_values changed on node ${d.id} (${d.type}): ${JSON.stringify(d.file)} -> ${JSON.stringify(d.loaded)}`)
    if (res.apiError) problems.push(`graphToPrompt failed: ${res.apiError}`)

    if (opts.screenshotDir) {
      mkdirSync(opts.screenshotDir, { recursive: true })
      await page.screenshot({ path: `${opts.screenshotDir}/${basename(file, '.json')}.png` })
    }
    const entry = { file, ok: problems.length === 0, problems, missing, toasts: res.toasts, widgetDiffs,
                    apiPrompt: res.apiPrompt, console: [...consoleMsgs] }
    report.push(entry)
    console.log(`${entry.ok ? 'OK  ' : 'FAIL'} ${file}`)
    for (const p of problems) console.log(`     - ${p}`)
    if (!entry.ok) exitCode = 1
  }
} catch (e) {
  console.error('infrastructure error:', e)
  exitCode = 2
} finally {
  await browser.close()
}
if (opts.json) writeFileSync(opts.json, JSON.stringify(report, null, 1))
process.exit(exitCode)
