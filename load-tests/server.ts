// A target server, run in its own process by the load-test runner. The
// runner passes its settings as JSON in argv[2] and talks to it over IPC:
// 'ready' with the port once listening, then 'stats' on request.
import Fastify from 'fastify'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import concurrencyLimit from 'fastify-concurrency-limit'

export interface ServerSettings {
  variant: 'bare' | 'plugin'
  serviceTime: number
  memoryKiB: number
  maxConcurrency: number
  maxQueue: number
  queueTimeout: number
}

export interface ServerStats {
  requests: number
  peakInFlight: number
  rssPeakMB: number
  rssMB: number
  eventLoopDelayP99Ms: number
  cpuMicros: number
  threadsPeak: number
  plugin: unknown
}

const settings = JSON.parse(process.argv[2] ?? '{}') as ServerSettings
const app = Fastify({ logger: false, forceCloseConnections: true, keepAliveTimeout: 30_000 })
if (settings.variant === 'plugin') {
  await app.register(concurrencyLimit, {
    maxConcurrency: settings.maxConcurrency,
    maxQueue: settings.maxQueue,
    queueTimeout: settings.queueTimeout
  })
}

let requests = 0
let inFlight = 0
let peakInFlight = 0
let rssPeak = 0
const eld = monitorEventLoopDelay({ resolution: 10 })
eld.enable()
let cpuMark = process.cpuUsage()

function sampleRss (): void {
  const rss = process.memoryUsage.rss()
  if (rss > rssPeak) rssPeak = rss
}
setInterval(sampleRss, 50).unref()

app.get('/hello', async () => 'hello')

// A route that waits on a simulated downstream and holds memory meanwhile,
// as a request that calls a database or another service does.
app.get('/work', async () => {
  requests++
  inFlight++
  if (inFlight > peakInFlight) peakInFlight = inFlight
  const held = Buffer.alloc(settings.memoryKiB * 1024, 1)
  try {
    await sleep(settings.serviceTime)
    return { ok: held[held.length - 1] === 1 }
  } finally {
    inFlight--
  }
})

function stats (): ServerStats {
  sampleRss()
  const cpu = process.cpuUsage(cpuMark)
  return {
    requests,
    peakInFlight,
    rssPeakMB: rssPeak / 2 ** 20,
    rssMB: process.memoryUsage.rss() / 2 ** 20,
    eventLoopDelayP99Ms: eld.percentile(99) / 1e6,
    cpuMicros: cpu.user + cpu.system,
    threadsPeak: 0,
    plugin: settings.variant === 'plugin' ? app.concurrencyLimit.stats() : null
  }
}

process.on('message', (message: { type: string }) => {
  if (message.type === 'stats') process.send?.({ type: 'stats', stats: stats() })
  if (message.type === 'reset') {
    requests = 0
    peakInFlight = inFlight
    rssPeak = 0
    eld.reset()
    cpuMark = process.cpuUsage()
    process.send?.({ type: 'reset' })
  }
})
process.on('disconnect', () => { process.exit(0) })

// A large backlog: the kernel's accept queue, not this process, would
// otherwise turn connections away during the connection sweep.
await app.listen({ host: '127.0.0.1', port: 0, backlog: 4096 })
const address = app.server.address()
process.send?.({ type: 'ready', port: typeof address === 'object' && address !== null ? address.port : 0 })
