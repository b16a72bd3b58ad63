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

/** What a generator counts, per bucket of the run and in all. */
export interface Counts {
  offered: number
  ok: number
  rejected: number
  timeouts: number
  errors: number
  latencies: number[]
  sentBy: number[]
  okBy: number[]
  rejectedBy: number[]
  timeoutsBy: number[]
}

export function newCounts (options: OpenLoopOptions): Counts {
  const buckets = Math.ceil(options.durationS / (options.bucketS ?? 1))
  const zeros = (): number[] => new Array<number>(buckets).fill(0)
  return { offered: 0, ok: 0, rejected: 0, timeouts: 0, errors: 0, latencies: [], sentBy: zeros(), okBy: zeros(), rejectedBy: zeros(), timeoutsBy: zeros() }
}

/** Counts an answer: a 2xx within the timeout is goodput, a 503 or 429 a refusal, anything else an error. */
export function countAnswer (counts: Counts, bucket: number, status: number, elapsedMs: number, timeoutMs: number): void {
  if (status >= 200 && status < 300 && elapsedMs <= timeoutMs) {
    counts.ok++
    counts.okBy[bucket]++
    counts.latencies.push(elapsedMs)
  } else if (status === 503 || status === 429) {
    counts.rejected++
    counts.rejectedBy[bucket]++
  } else {
    counts.errors++
  }
}

export function countTimeout (counts: Counts, bucket: number): void {
  counts.timeouts++
  counts.timeoutsBy[bucket]++
}

/**
 * Sends on schedule: exponential gaps between arrivals (Poisson), and every
 * millisecond the loop calls `fire` for each arrival due, with its bucket
 * and the moment it is sent, and `each` with the time. Returns once the run's
 * time is over; the requests still open are the caller's.
 */
export async function sendOnSchedule (options: OpenLoopOptions, counts: Counts, fire: (bucket: number, now: number) => void, each?: (now: number) => void): Promise<void> {
  const rateAt = typeof options.rate === 'function' ? options.rate : () => options.rate as number
  const bucketS = options.bucketS ?? 1
  const last = counts.sentBy.length - 1
  const start = performance.now()
  let next = start
  for (;;) {
    const now = performance.now()
    each?.(now)
    if ((now - start) / 1000 >= options.durationS) return
    while (next <= now) {
      const at = (next - start) / 1000
      const bucket = Math.min(last, Math.floor(at / bucketS))
      counts.offered++
      counts.sentBy[bucket]++
      fire(bucket, now)
      next += -Math.log(1 - Math.random()) * 1000 / Math.max(1e-9, rateAt(at))
    }
    await new Promise((resolve) => setTimeout(resolve, 1))
  }
}

/** The generator's own CPU and event-loop lag from now to the returned function's call. */
export function watchGenerator (): () => { cpuS: number, lagP99Ms: number } {
  const cpu = process.cpuUsage()
  const lag = monitorEventLoopDelay({ resolution: 5 })
  lag.enable()
  return () => {
    lag.disable()
    const used = process.cpuUsage(cpu)
    return { cpuS: (used.user + used.system) / 1e6, lagP99Ms: lag.percentile(99) / 1e6 }
  }
}

export function resultOf (options: OpenLoopOptions, counts: Counts, connectionsOpened: number, generator: { cpuS: number, lagP99Ms: number }): OpenLoopResult {
  const duration = options.durationS
  const bucketS = options.bucketS ?? 1
  return {
    offered: counts.offered,
    offeredPerS: counts.offered / duration,
    ok: counts.ok,
    goodputPerS: counts.ok / duration,
    rejected: counts.rejected,
    timeouts: counts.timeouts,
    errors: counts.errors,
    latencyOk: summarize(counts.latencies),
    connectionsOpened,
    generatorCpuS: generator.cpuS,
    generatorLagP99Ms: generator.lagP99Ms,
    series: counts.sentBy.map((sent, i) => ({
      t: i * bucketS,
      offeredPerS: sent / bucketS,
      goodputPerS: counts.okBy[i] / bucketS,
      rejectedPerS: counts.rejectedBy[i] / bucketS,
      timeoutsPerS: counts.timeoutsBy[i] / bucketS
    }))
  }
}

export async function openLoop (options: OpenLoopOptions): Promise<OpenLoopResult> {
  const agent = new Agent({ connections: options.connections, pipelining: 1, keepAliveTimeout: 10_000 })
  let connectionsOpened = 0
  agent.on('connect', () => { connectionsOpened++ })
  const counts = newCounts(options)
  const pending = new Set<Promise<void>>()

  const fire = (bucket: number): void => {
    const started = performance.now()
    const signal = AbortSignal.timeout(options.timeoutMs)
    const p = request(options.url, { dispatcher: agent, signal }).then(async (res) => {
      await res.body.dump()
      countAnswer(counts, bucket, res.statusCode, performance.now() - started, options.timeoutMs)
    }, (err: Error) => {
      if (err.name === 'TimeoutError' || err.name === 'AbortError') countTimeout(counts, bucket)
      else counts.errors++
    }).finally(() => { pending.delete(p) })
    pending.add(p)
  }

  const stop = watchGenerator()
  await sendOnSchedule(options, counts, fire)
  await Promise.all(pending)
  const generator = stop()
  await agent.destroy()
  return resultOf(options, counts, connectionsOpened, generator)
}
