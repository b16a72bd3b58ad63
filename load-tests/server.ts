// A target server, run in its own process by the load-test runner. The
// runner passes its settings as JSON in argv[2] and talks to it over IPC:
// 'ready' with the port once listening, then 'stats' on request.
import Fastify, { type FastifyReply, type FastifyRequest } from 'fastify'
import { readdirSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { Worker } from 'node:worker_threads'
import { Pool as HttpPool } from 'undici'
import { Piscina } from 'piscina'
import underPressure from '@fastify/under-pressure'
import concurrencyLimit from 'fastify-concurrency-limit'
import { summarize } from './stats.js'

export interface ServerSettings {
  /**
   * raw: node:http answering 503 (raw-server.ts); under-pressure: bare
   * Fastify behind @fastify/under-pressure (options in `underPressure`).
   */
  variant: 'bare' | 'plugin' | 'raw' | 'under-pressure'
  serviceTime: number
  memoryKiB: number
  maxConcurrency: number
  maxQueue: number
  queueTimeout: number
  /**
   * Parallel calls the simulated downstream serves (a database pool, say);
   * more wait in its own unbounded queue. 0: no limit, a fixed latency.
   */
  downstreamConcurrency?: number
  /** The listen backlog (default 4096). */
  backlog?: number
  /** Add an empty onRequest and an empty onResponse hook: the bench's yardstick. */
  emptyHooks?: boolean
  /** Prometheus metrics on a registry of prom-client's, scraped at /metrics. */
  metrics?: boolean
  /** More plugin options (the mechanisms of the retry-storm scenario). */
  plugin?: Record<string, unknown>
  /** Register the plugin with `plugin` alone: its defaults for everything else. */
  pluginOnly?: boolean
  /** CPU milliseconds of one /cpu-* request. */
  cpuMs?: number
  /** Threads of the /cpu-pool pool (default: cores). */
  poolThreads?: number
  /** Options of @fastify/under-pressure, for its variant. */
  underPressure?: Record<string, unknown>
  /** /work-{critical,normal,sheddable} carry their class (else all are normal). */
  priorities?: boolean
  /** Return every 2xx of /work in stats (`oks`), for figures over part of a run. */
  recordOks?: boolean
  /**
   * The downstream's parallel calls over time, from the last 'reset':
   * [seconds, slots] steps. The server then samples its pool every 100 ms.
   */
  downstreamSchedule?: Array<[number, number]>
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
  /** Server-side arrival-to-finish latency of 2xx answers of /work. */
  okLatency: { count: number, p50: number, p99: number, max: number }
  /** With a downstream schedule: [ms, limit, in flight, downstream slots] every 100 ms. */
  timeline?: Array<[number, number, number, number]>
  /** With a downstream schedule or `recordOks`: [finished at ms, latency ms] of each 2xx. */
  oks?: Array<[number, number]>
}

export interface ServerMemory {
  /** False when the process was started without --expose-gc: figures include garbage. */
  collected: boolean
  heapUsedMB: number
  /** Buffers and other memory outside the JS heap. */
  externalMB: number
  rssMB: number
  connections: number
  queued: number
  heldRejections: number
}

const settings = JSON.parse(process.argv[2] ?? '{}') as ServerSettings
const app = Fastify({ logger: false, forceCloseConnections: true, keepAliveTimeout: 30_000 })
if (settings.variant === 'plugin') {
  const registry = settings.metrics === true ? new (await import('prom-client')).Registry() : null
  await app.register(concurrencyLimit, settings.pluginOnly === true
    ? { groups: { saturated: { maxConcurrency: 1, maxQueue: 0 } }, ...settings.plugin }
    : {
        maxConcurrency: settings.maxConcurrency,
        maxQueue: settings.maxQueue,
        queueTimeout: settings.queueTimeout,
        groups: { saturated: { maxConcurrency: 1, maxQueue: 0 } },
        ...(registry === null ? {} : { metrics: { registry }, exempt: ['/metrics'] }),
        ...settings.plugin
      })
  if (registry !== null) {
    app.get('/metrics', async (_request, reply) => {
      reply.type(registry.contentType)
      return await registry.metrics()
    })
  }
}
if (settings.variant === 'under-pressure') await app.register(underPressure, settings.underPressure ?? {})

// Arrival-to-finish time of each 2xx answer of /work, measured here so that
// a saturated load generator cannot inflate it. A fixed-size reservoir.
const okLatencies = new Float64Array(200_000)
let okCount = 0
const kStarted = Symbol('started')
app.decorateRequest(kStarted as unknown as string, 0)
app.addHook('onRequest', (request, _reply, done) => {
  (request as unknown as Record<symbol, number>)[kStarted] = performance.now()
  done()
})

// When each of them finished, in ms since the last reset.
const okAt = new Float64Array(okLatencies.length)
let resetAt = performance.now()

function recordOk (request: FastifyRequest, reply: FastifyReply): void {
  reply.raw.once('finish', () => {
    if (reply.statusCode < 300 && okCount < okLatencies.length) {
      const now = performance.now()
      okAt[okCount] = now - resetAt
      okLatencies[okCount++] = now - (request as unknown as Record<symbol, number>)[kStarted]
    }
  })
}

let requests = 0
let inFlight = 0
let peakInFlight = 0
let rssPeak = 0
let threadsPeak = 0
const eld = monitorEventLoopDelay({ resolution: 10 })
eld.enable()
let cpuMark = process.cpuUsage()

function sampleRss (): void {
  const rss = process.memoryUsage.rss()
  if (rss > rssPeak) rssPeak = rss
  // Every thread of this process, as the kernel sees them (Linux only).
  try {
    const threads = readdirSync('/proc/self/task').length
    if (threads > threadsPeak) threadsPeak = threads
  } catch {}
}
setInterval(sampleRss, 50).unref()

if (settings.emptyHooks === true) {
  app.register(async (scope) => {
    scope.addHook('onRequest', (_request, _reply, done) => { done() })
    scope.addHook('onResponse', (_request, _reply, done) => { done() })
    scope.get('/hello-hooks', async () => 'hello')
  })
  // The plugin's own shape: one route-level onRequest hook.
  app.get('/hello-hook', { onRequest: (_request, _reply, done) => { done() } }, async () => 'hello')
}
app.get('/hello', async () => 'hello')

// The cost of a rejection. Fastify answering a fixed 503 from onRequest:
const BODY_503 = '{"statusCode":503,"code":"FST_CONCURRENCY_LIMIT_QUEUE_FULL","error":"Service Unavailable","message":"Too many requests in flight and the queue is full, retry later"}'
app.get('/early-503', {
  config: { concurrencyLimit: false },
  onRequest: (_request, reply, _done) => {
    reply.code(503).header('retry-after', 1).type('application/json; charset=utf-8').send(BODY_503)
  }
}, async () => 'unreachable')
// The plugin's rejection: a pool of one slot, taken for good by /saturate.
app.get('/saturate', { config: { concurrencyLimit: { group: 'saturated' } } }, () => { /* never answers */ })
app.get('/rejected', { config: { concurrencyLimit: { group: 'saturated' } } }, async () => 'unreachable')
// What a waiter costs: one slot, taken for minutes by the first request, and
// a queue deep enough for every later one.
app.get('/queued', { config: { concurrencyLimit: { maxConcurrency: 1, maxQueue: 100_000, queueTimeout: 600_000 } } }, async () => {
  await sleep(600_000, undefined, { ref: false })
  return 'late'
})

// The simulated downstream: at most `slots` calls at once, each taking
// `serviceTime`; the rest wait in an unbounded FIFO, as callers of a
// saturated database pool do. It serves calls whose client left, too.
class Downstream {
  slots: number
  active = 0
  readonly #waiting: Array<() => void> = []
  #head = 0

  constructor (slots: number) {
    this.slots = slots
  }

  async call (ms: number): Promise<void> {
    if (this.slots > 0) {
      if (this.active >= this.slots) await new Promise<void>((resolve) => this.#waiting.push(resolve))
      else this.active++
    }
    try {
      await sleep(ms)
    } finally {
      if (this.slots > 0) this.#next()
    }
  }

  /** Changes the parallel calls served: more start waiting calls at once, fewer let running ones finish. */
  setSlots (slots: number): void {
    this.slots = slots
    while (this.active < this.slots && this.#head < this.#waiting.length) {
      this.active++
      this.#take()()
    }
  }

  #take (): () => void {
    const resolve = this.#waiting[this.#head]
    this.#waiting[this.#head++] = noop
    if (this.#head > 1024 && this.#head * 2 > this.#waiting.length) {
      this.#waiting.splice(0, this.#head)
      this.#head = 0
    }
    return resolve
  }

  #next (): void {
    if (this.active > this.slots) {
      this.active--
      return
    }
    if (this.#head < this.#waiting.length) {
      this.#take()() // the slot passes on
    } else {
      this.active--
    }
  }
}
function noop (): void {}
const downstream = new Downstream(settings.downstreamConcurrency ?? 0)

// A route that waits on a simulated downstream and holds memory meanwhile,
// as a request that calls a database or another service does.
app.get('/work', async (request, reply) => {
  recordOk(request, reply)
  requests++
  inFlight++
  if (inFlight > peakInFlight) peakInFlight = inFlight
  const held = Buffer.alloc(settings.memoryKiB * 1024, 1)
  try {
    await downstream.call(settings.serviceTime)
    return { ok: held[held.length - 1] === 1 }
  } finally {
    inFlight--
  }
})

// The same work in three priority classes, sharing the plugin's pool.
for (const priority of ['critical', 'normal', 'sheddable'] as const) {
  const config = { concurrencyLimit: settings.priorities === true ? { priority } : true }
  app.get(`/work-${priority}`, { config }, async () => {
    requests++
    inFlight++
    if (inFlight > peakInFlight) peakInFlight = inFlight
    try {
      await downstream.call(settings.serviceTime)
      return 'ok'
    } finally {
      inFlight--
    }
  })
}

// Thread explosion: CPU work on a new thread per request, against a bounded
// pool whose own queue is bounded, behind the plugin.
const workerPath = fileURLToPath(new URL('./cpu-worker.js', import.meta.url))
const cpuMs = settings.cpuMs ?? 5
const poolThreads = settings.poolThreads ?? availableParallelism()
const piscina = new Piscina({ filename: workerPath, minThreads: poolThreads, maxThreads: poolThreads, maxQueue: poolThreads * 4 })

app.get('/cpu-thread', async (request, reply) => {
  recordOk(request, reply)
  requests++
  inFlight++
  if (inFlight > peakInFlight) peakInFlight = inFlight
  try {
    const worker = new Worker(workerPath, { workerData: { ms: cpuMs, oneShot: true } })
    const [n] = await Promise.all([
      new Promise((resolve, reject) => { worker.once('message', resolve); worker.once('error', reject) }),
      new Promise((resolve) => worker.once('exit', resolve))
    ])
    return { n }
  } finally {
    inFlight--
  }
})

app.get('/cpu-pool', { config: { concurrencyLimit: { maxConcurrency: poolThreads * 2, maxQueue: poolThreads * 8 } } }, async (request, reply) => {
  recordOk(request, reply)
  requests++
  inFlight++
  if (inFlight > peakInFlight) peakInFlight = inFlight
  try {
    return { n: await piscina.run({ ms: cpuMs }) }
  } catch (err) {
    // piscina's own bounded queue is full: push back, do not wait.
    if ((err as Error).message.includes('queue is at limit')) return reply.code(503).header('retry-after', 1).send({ error: 'pool queue full' })
    throw err
  } finally {
    inFlight--
  }
})

// CPU-bound work on the event loop itself: rendering, large JSON, sync
// parsing. The number of requests in flight stays at one, whatever the load.
app.get('/cpu-sync', async (request, reply) => {
  recordOk(request, reply)
  requests++
  const until = performance.now() + cpuMs
  let n = 0
  while (performance.now() < until) n++
  return { n }
})

// Deadlock by self-call: /outer calls /inner-* on this same server and waits.
const selfCall: { pool?: HttpPool } = {}
app.get('/outer', async (request, reply) => {
  requests++
  const inner = (request.query as { inner?: string }).inner === 'own' ? '/inner-own' : '/inner-shared'
  const res = await (selfCall.pool as HttpPool).request({ path: inner, method: 'GET' })
  await res.body.dump()
  if (res.statusCode !== 200) return reply.code(502).send({ error: `inner answered ${res.statusCode}` })
  return { ok: true }
})
app.get('/inner-shared', async () => { await sleep(settings.serviceTime); return 'inner' })
app.get('/inner-own', { config: { concurrencyLimit: { maxConcurrency: settings.maxConcurrency } } }, async () => {
  await sleep(settings.serviceTime)
  return 'inner'
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
    threadsPeak,
    plugin: settings.variant === 'plugin' ? app.concurrencyLimit.stats() : null,
    okLatency: { count: okCount, ...summarize(Array.from(okLatencies.subarray(0, okCount))) },
    ...(settings.downstreamSchedule === undefined ? {} : { timeline }),
    ...(settings.downstreamSchedule === undefined && settings.recordOks !== true
      ? {}
      : { oks: Array.from(okAt.subarray(0, okCount), (at, i) => [Math.round(at), Math.round(okLatencies[i] * 10) / 10] as [number, number]) })
  }
}

// With a downstream schedule: the pool's limit, in flight and the
// downstream's slots every 100 ms from the last reset.
const timeline: Array<[number, number, number, number]> = []
let phaseTimers: NodeJS.Timeout[] = []
function startSchedule (schedule: Array<[number, number]>): void {
  for (const timer of phaseTimers) clearTimeout(timer)
  timeline.length = 0
  phaseTimers = schedule.map(([atS, slots]) => setTimeout(() => { downstream.setSlots(slots) }, atS * 1000))
  const sample = setInterval(() => {
    const pool = settings.variant === 'plugin' ? app.concurrencyLimit.stats() : null
    timeline.push([Math.round(performance.now() - resetAt), pool?.limit ?? 0, pool?.inFlight ?? inFlight, downstream.slots])
  }, 100)
  sample.unref()
  phaseTimers.push(sample)
}

/** Live memory after a full collection (run with --expose-gc), and what holds it. */
async function memory (): Promise<ServerMemory> {
  const gc = (globalThis as { gc?: () => void }).gc
  // Twice: the first pass can leave objects that only a second one frees.
  gc?.()
  gc?.()
  const usage = process.memoryUsage()
  const connections = await new Promise<number>((resolve) => { app.server.getConnections((_err, count) => { resolve(count) }) })
  const pools = settings.variant === 'plugin' ? app.concurrencyLimit.pools() : []
  return {
    collected: gc !== undefined,
    heapUsedMB: usage.heapUsed / 2 ** 20,
    // external already includes arrayBuffers (Buffers among them).
    externalMB: usage.external / 2 ** 20,
    rssMB: usage.rss / 2 ** 20,
    connections,
    queued: pools.reduce((sum, p) => sum + p.queued, 0),
    heldRejections: pools.reduce((sum, p) => sum + p.heldRejections, 0)
  }
}

process.on('message', (message: { type: string }) => {
  if (message.type === 'stats') process.send?.({ type: 'stats', stats: stats() })
  if (message.type === 'memory') memory().then((m) => process.send?.({ type: 'memory', memory: m }), (err: Error) => { console.error(err) })
  if (message.type === 'reset') {
    requests = 0
    peakInFlight = inFlight
    rssPeak = 0
    threadsPeak = 0
    okCount = 0
    eld.reset()
    cpuMark = process.cpuUsage()
    resetAt = performance.now()
    if (settings.downstreamSchedule !== undefined) startSchedule(settings.downstreamSchedule)
    process.send?.({ type: 'reset' })
  }
})
process.on('disconnect', () => { process.exit(0) })

// A large backlog: the kernel's accept queue, not this process, would
// otherwise turn connections away during the connection sweep.
await app.listen({ host: '127.0.0.1', port: 0, backlog: settings.backlog ?? 4096 })
const address = app.server.address()
const port = typeof address === 'object' && address !== null ? address.port : 0
selfCall.pool = new HttpPool(`http://127.0.0.1:${port}`, { connections: 1024 })
process.send?.({ type: 'ready', port })
