// Starts a real Prometheus scraping the demo app (app.mjs) every second,
// puts the app under a short load from this process, then asks Prometheus's
// HTTP API whether every metric the plugin registers has data and every
// query of examples/grafana-dashboard.json returns some.
//
//   npm run build && node examples/prometheus/run.mjs
//
// Needs the `prometheus` binary on PATH (Debian: apt-get install prometheus)
// or in $PROMETHEUS. Ends with "prometheus example: N passed, N failed".
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Client, Pool } from 'undici'

const LOAD_SECONDS = Number(process.env.LOAD_SECONDS ?? 8)
const RATE_WINDOW = '30s'
const PREFIX = 'fastify_concurrency_limit_'
const here = new URL('.', import.meta.url)
const prometheusBin = process.env.PROMETHEUS ?? 'prometheus'
const started = Date.now()
const children = []
const dir = mkdtempSync(join(tmpdir(), 'fcl-prometheus-'))

let passed = 0
let failed = 0
function check (ok, what) {
  if (ok) passed++
  else failed++
  console.log(`${ok ? 'ok' : 'not ok'} - ${what}`)
}

function start (command, args, name) {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  children.push(child)
  let stderr = ''
  child.stderr.on('data', (chunk) => { stderr = (stderr + chunk).slice(-4000) })
  child.on('error', (err) => { console.error(`${name}: ${err.message}`) })
  child.exited = once(child, 'exit').catch(() => {})
  child.stderrTail = () => stderr
  return child
}

async function freePort () {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address()
  server.close()
  await once(server, 'close')
  return port
}

async function until (what, check, ms) {
  const deadline = Date.now() + ms
  for (;;) {
    try {
      if (await check()) return
    } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(200)
  }
}

async function query (api, promql, time) {
  const url = `${api}/api/v1/query?query=${encodeURIComponent(promql)}${time === undefined ? '' : `&time=${time}`}`
  const res = await fetch(url)
  const body = await res.json()
  if (body.status !== 'success') throw new Error(`${promql}: ${body.error ?? res.status}`)
  return body.data.result
}

/** One client: requests in a loop until `end`, each made by `next()`. */
async function loop (dispatcher, end, next) {
  while (Date.now() < end) {
    const { path, signal } = next()
    try {
      const res = await dispatcher.request({ path, method: 'GET', signal })
      await res.body.dump()
    } catch {}
  }
}

async function main () {
  // 1. The app.
  const app = start(process.execPath, [new URL('app.mjs', here).pathname, '0'], 'app')
  const [line] = await Promise.race([
    once(app.stdout, 'data'),
    app.exited.then(() => { throw new Error(`the app exited: ${app.stderrTail()}`) })
  ])
  const { port } = JSON.parse(String(line))
  const origin = `http://127.0.0.1:${port}`

  // 2. Prometheus, scraping it every second.
  const promPort = await freePort()
  const config = join(dir, 'prometheus.yml')
  writeFileSync(config, [
    'global:',
    '  scrape_interval: 1s',
    '  evaluation_interval: 1s',
    'scrape_configs:',
    '  - job_name: demo',
    '    static_configs:',
    `      - targets: ['127.0.0.1:${port}']`,
    ''
  ].join('\n'))
  const prometheus = start(prometheusBin, [
    `--config.file=${config}`,
    `--storage.tsdb.path=${join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${promPort}`,
    '--log.level=warn'
  ], 'prometheus')
  const api = `http://127.0.0.1:${promPort}`
  await Promise.race([
    until('Prometheus to be ready', async () => (await fetch(`${api}/-/ready`)).ok, 30_000),
    prometheus.exited.then(() => { throw new Error(`prometheus exited: ${prometheus.stderrTail()}`) })
  ])
  await until('a first scrape', async () => (await query(api, 'up{job="demo"}'))[0]?.value[1] === '1', 15_000)
  check(true, `Prometheus ${promPort} scrapes the app on ${port}`)

  // 3. A short load: more than the pools take (queued, refused for a full
  // queue or a timeout, abandoned by impatient clients) and more connections
  // than maxConnections.
  console.log(`# load for ${LOAD_SECONDS} s`)
  const end = Date.now() + LOAD_SECONDS * 1000
  const work = new Pool(origin, { connections: 30 })
  const reports = new Pool(origin, { connections: 4 })
  const impatient = new Pool(origin, { connections: 2 })
  let burst = 0
  const bursts = (async () => {
    while (Date.now() < end) {
      const clients = Array.from({ length: 10 }, () => new Client(origin))
      await Promise.all(clients.map(async (client) => {
        try { await (await client.request({ path: '/work?ms=5', method: 'GET' })).body.dump() } catch {}
        await client.destroy()
      }))
      burst++
      await sleep(300)
    }
  })()
  await Promise.all([
    ...Array.from({ length: 30 }, () => loop(work, end, () => ({ path: `/work?ms=${Math.random() < 0.25 ? 300 : 20 + Math.floor(Math.random() * 40)}` }))),
    ...Array.from({ length: 4 }, () => loop(reports, end, () => ({ path: '/report' }))),
    ...Array.from({ length: 2 }, () => loop(impatient, end, () => ({ path: '/work?ms=20', signal: AbortSignal.timeout(15) }))),
    bursts
  ])
  await Promise.all([work.destroy(), reports.destroy(), impatient.destroy()])
  const at = (Date.now() - 500) / 1000
  console.log(`# ${burst} connection bursts; waiting for the last scrape`)
  await sleep(2500)

  // 4. Every metric the plugin registers has data...
  const exposition = await (await fetch(`${origin}/metrics`)).text()
  const families = [...exposition.matchAll(/^# TYPE (\S+) (\S+)$/gm)].filter(([, name]) => name.startsWith(PREFIX))
  check(families.length === 9, `the app exposes 9 metric families (${families.length})`)
  for (const [, name, type] of families) {
    for (const series of type === 'histogram' ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : [name]) {
      const result = await query(api, `count({__name__="${series}"})`, at)
      check(result.length === 1 && Number(result[0].value[1]) > 0, `${series}: ${result[0]?.value[1] ?? 0} series in Prometheus`)
    }
  }
  // ...the load did what it was meant to...
  for (const result of ['admitted', 'queue_full', 'queue_timeout', 'abandoned']) {
    const [sample] = await query(api, `sum(${PREFIX}requests_total{result="${result}"})`, at)
    check(Number(sample?.value[1] ?? 0) > 0, `requests_total{result="${result}"} = ${sample?.value[1] ?? 'none'}`)
  }
  const [refused] = await query(api, `${PREFIX}connections_refused_total`, at)
  check(Number(refused?.value[1] ?? 0) > 0, `connections_refused_total = ${refused?.value[1] ?? 'none'}`)

  // ...and every query of the dashboard returns data.
  const dashboard = JSON.parse(readFileSync(new URL('../grafana-dashboard.json', here), 'utf8'))
  for (const panel of dashboard.panels) {
    for (const target of panel.targets) {
      const promql = target.expr.replaceAll('$__rate_interval', RATE_WINDOW).replaceAll('$pool', '.*')
      const result = await query(api, promql, at)
      check(result.length > 0, `${panel.title} / ${target.legendFormat}: ${result.length} series`)
    }
  }
}

async function stop () {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
  }
  const timeout = sleep(5000).then(() => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  })
  await Promise.race([Promise.all(children.map((child) => child.exited)), timeout])
  rmSync(dir, { recursive: true, force: true })
}

process.on('SIGINT', () => { stop().finally(() => process.exit(130)) })

try {
  await main()
} catch (err) {
  check(false, err.message)
  if (err.code === 'ENOENT' || /prometheus exited/.test(err.message)) {
    console.log(`# is Prometheus installed? Set $PROMETHEUS or put it on PATH (Debian: apt-get install prometheus); tried "${prometheusBin}"`)
  }
} finally {
  await stop()
}
console.log(`# ${((Date.now() - started) / 1000).toFixed(1)} s`)
console.log(`prometheus example: ${passed} passed, ${failed} failed`)
process.exitCode = failed === 0 ? 0 : 1
