// An open-loop load generator: requests leave on a schedule (Poisson
// arrivals at a set rate) whatever the server answers, each with a client
// timeout. Unlike a closed loop, a slow server does not slow the offered load.
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { Agent, request } from 'undici'
import { summarize, type Latency } from './stats.js'

export interface OpenLoopOptions {
  url: string
  /** Arrivals per second; a function of elapsed seconds for a step profile. */
  rate: number | ((elapsedS: number) => number)
  durationS: number
  timeoutMs: number
  connections: number
  /** Width of the goodput time series buckets, in seconds. */
  bucketS?: number
}

export interface OpenLoopResult {
  offered: number
  offeredPerS: number
  ok: number
  goodputPerS: number
  rejected: number
  timeouts: number
  errors: number
  latencyOk: Latency
  /** Connections the generator opened: a client timeout closes its connection, the next request opens another. */
  connectionsOpened: number
  /** CPU seconds the generator used: on a shared machine, near a core means it, not the server, set the pace. */
  generatorCpuS: number
  /** Event-loop lag of the generator itself: high values mean it, not the server, was the bottleneck. */
  generatorLagP99Ms: number
  /** Goodput per bucket, for recovery curves. */
  series: Array<{ t: number, offeredPerS: number, goodputPerS: number, rejectedPerS: number, timeoutsPerS: number }>
}

export async function openLoop (options: OpenLoopOptions): Promise<OpenLoopResult> {
  const agent = new Agent({ connections: options.connections, pipelining: 1, keepAliveTimeout: 10_000 })
  let connectionsOpened = 0
  agent.on('connect', () => { connectionsOpened++ })
  const bucketS = options.bucketS ?? 1
  const buckets = Math.ceil(options.durationS / bucketS)
  const sentBy = new Array<number>(buckets).fill(0)
  const okBy = new Array<number>(buckets).fill(0)
  const rejectedBy = new Array<number>(buckets).fill(0)
  const timeoutsBy = new Array<number>(buckets).fill(0)
  const latencies: number[] = []
  let offered = 0
  let ok = 0
  let rejected = 0
  let timeouts = 0
  let errors = 0
  const pending = new Set<Promise<void>>()
  const rateAt = typeof options.rate === 'function' ? options.rate : () => options.rate as number

  const fire = (bucket: number): void => {
    offered++
    sentBy[bucket]++
    const started = performance.now()
    const signal = AbortSignal.timeout(options.timeoutMs)
    const p = request(options.url, { dispatcher: agent, signal }).then(async (res) => {
      await res.body.dump()
      const elapsed = performance.now() - started
      if (res.statusCode >= 200 && res.statusCode < 300 && elapsed <= options.timeoutMs) {
        ok++
        okBy[bucket]++
        latencies.push(elapsed)
      } else if (res.statusCode === 503 || res.statusCode === 429) {
        rejected++
        rejectedBy[bucket]++
      } else {
        errors++
      }
    }, (err: Error) => {
      if (err.name === 'TimeoutError' || err.name === 'AbortError') {
        timeouts++
        timeoutsBy[bucket]++
      } else errors++
    }).finally(() => { pending.delete(p) })
    pending.add(p)
  }

  const cpu = process.cpuUsage()
  const lag = monitorEventLoopDelay({ resolution: 5 })
  lag.enable()
  const start = performance.now()
  let next = start
  // Exponential gaps between arrivals; every ms the loop sends what is due.
  for (;;) {
    const now = performance.now()
    const elapsedS = (now - start) / 1000
    if (elapsedS >= options.durationS) break
    while (next <= now) {
      const at = (next - start) / 1000
      fire(Math.min(buckets - 1, Math.floor(at / bucketS)))
      next += -Math.log(1 - Math.random()) * 1000 / Math.max(1e-9, rateAt(at))
    }
    await new Promise((resolve) => setTimeout(resolve, 1))
  }
  await Promise.all(pending)
  lag.disable()
  const used = process.cpuUsage(cpu)
  await agent.destroy()
  const duration = options.durationS
  return {
    offered,
    offeredPerS: offered / duration,
    ok,
    goodputPerS: ok / duration,
    rejected,
    timeouts,
    errors,
    latencyOk: summarize(latencies),
    connectionsOpened,
    generatorCpuS: (used.user + used.system) / 1e6,
    generatorLagP99Ms: lag.percentile(99) / 1e6,
    series: sentBy.map((sent, i) => ({ t: i * bucketS, offeredPerS: sent / bucketS, goodputPerS: okBy[i] / bucketS, rejectedPerS: rejectedBy[i] / bucketS, timeoutsPerS: timeoutsBy[i] / bucketS }))
  }
}
