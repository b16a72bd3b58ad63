// The load generator of `tune`: a closed loop that keeps exactly N requests
// in flight for each level, over keep-alive connections, with node:http.
import http from 'node:http'
import https from 'node:https'
import { performance } from 'node:perf_hooks'
import { nextRefinement, trend, type Step } from './knee.js'

export type StopReason =
  | 'knee' // throughput stopped growing and latency climbed
  | 'errors' // a level failed (errors or unexpected statuses)
  | 'max' // every level was measured
  | 'time' // --max-seconds
  | 'requests' // --max-requests
  | 'interrupted' // Ctrl-C
  | 'preflight' // the first request failed: nothing was swept

export interface SweepOptions {
  url: URL
  method: string
  headers: Record<string, string | string[]>
  body?: Buffer
  /** Certificates to trust for https, PEM. */
  ca?: Buffer
  /** Statuses that count as success: '2xx', '200,204', '2xx,304'. */
  expectStatus: string
  /** Doubling levels, in order. */
  levels: number[]
  stepMs: number
  /** Bound on the whole sweep, the first request included. */
  maxMs: number
  maxRequests: number
  /** A request unanswered after this long is an error. */
  timeoutMs: number
  /** Aborting it stops the sweep; what was measured is returned. */
  signal?: AbortSignal
  /** Called after each step. */
  onStep?: (step: Step) => void
}

/** The first request, sent alone before the sweep. */
export interface Preflight {
  ok: boolean
  latencyMs: number
  status?: number
  error?: string
  /** The start of the answer's body, when the status was not expected. */
  body?: string
}

export interface SweepResult {
  steps: Step[]
  stoppedBy: StopReason
  /** The last doubling step still grew: the knee may be above the largest level measured. */
  growing: boolean
  preflight: Preflight
  requests: number
  elapsedMs: number
}

/**
 * Compiles an --expect-status value ('2xx', '200,204', '2xx,304') into a test
 * of a status; undefined if the value is not such a list.
 */
export function statusMatcher (spec: string): ((status: number) => boolean) | undefined {
  const exact = new Set<number>()
  const classes = new Set<number>()
  for (const part of spec.split(',').map((p) => p.trim().toLowerCase())) {
    if (/^[1-5]xx$/.test(part)) classes.add(Number(part[0]))
    else if (/^[1-5]\d\d$/.test(part)) exact.add(Number(part))
    else return undefined
  }
  return (status) => exact.has(status) || classes.has(Math.floor(status / 100))
}

type Outcome =
  | { kind: 'answer', status: number, body?: string }
  | { kind: 'error', code: string }
  | { kind: 'cancelled' }

interface Tally {
  answered: number
  /** Start of the slot's second request, ms since the step started. */
  secondStart: number
  /** Successful answers after the first. */
  okAfterFirst: number
  /** End of the slot's last answer, ms since the step started. */
  lastEnd: number
}

/** Latency samples of one step: of each slot's first request (the warm-up), and of the others. */
interface Samples {
  warmUp: number[]
  steady: number[]
}

const ERROR_PAUSE_MS = 10
const BODY_SNIPPET = 200

export async function sweep (options: SweepOptions): Promise<SweepResult> {
  const started = performance.now()
  const deadline = started + options.maxMs
  const isExpected = statusMatcher(options.expectStatus)
  if (isExpected === undefined) throw new TypeError(`invalid expectStatus: ${options.expectStatus}`)
  const secure = options.url.protocol === 'https:'
  const agentOptions = { keepAlive: true, maxFreeSockets: Math.max(...options.levels) }
  const agent = secure ? new https.Agent({ ...agentOptions, ca: options.ca }) : new http.Agent(agentOptions)
  const request = secure ? https.request : http.request

  // Aborted at the deadline or by the caller: cancels the requests in flight.
  const hard = new AbortController()
  const inFlight = new Set<http.ClientRequest>()
  const cancelAll = (): void => { for (const req of inFlight) req.destroy() }
  hard.signal.addEventListener('abort', cancelAll)
  const onAbort = (): void => hard.abort('interrupted')
  options.signal?.addEventListener('abort', onAbort)
  if (options.signal?.aborted === true) onAbort()
  const deadlineTimer = setTimeout(() => hard.abort('time'), options.maxMs)
  let remaining = options.maxRequests

  /** A bound that ends the sweep now, whatever the next step would be. */
  const cut = (): StopReason | undefined => hard.signal.aborted
    ? hard.signal.reason as StopReason
    : remaining <= 0 ? 'requests' : undefined
  const noTimeFor = (): boolean => performance.now() + options.stepMs > deadline

  const send = (keepBody: boolean): Promise<Outcome> => new Promise((resolve) => {
    if (hard.signal.aborted) return resolve({ kind: 'cancelled' })
    let settled = false
    const finish = (outcome: Outcome): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      inFlight.delete(req)
      resolve(hard.signal.aborted ? { kind: 'cancelled' } : outcome)
    }
    const req = request(options.url, { method: options.method, headers: options.headers, agent }, (res) => {
      const chunks: Buffer[] = []
      let length = 0
      res.on('data', (chunk: Buffer) => {
        if (keepBody && length < BODY_SNIPPET) { chunks.push(chunk); length += chunk.length }
      })
      res.on('end', () => finish({
        kind: 'answer',
        status: res.statusCode as number,
        body: keepBody ? Buffer.concat(chunks).toString('utf8', 0, BODY_SNIPPET) : undefined
      }))
      // The connection closed before the answer ended: 'close' without 'end'.
      let code = 'ECONNRESET'
      res.on('error', (err: NodeJS.ErrnoException) => { code = errorCode(err) })
      res.on('close', () => finish({ kind: 'error', code }))
    })
    const timer = setTimeout(() => {
      const err: NodeJS.ErrnoException = new Error('timeout')
      err.code = 'timeout'
      req.destroy(err)
    }, options.timeoutMs)
    req.on('error', (err: NodeJS.ErrnoException) => finish({ kind: 'error', code: errorCode(err) }))
    inFlight.add(req)
    remaining--
    req.end(options.body)
  })

  const slot = async (stepStart: number, issueUntil: number, step: Step, samples: Samples): Promise<Tally> => {
    const tally: Tally = { answered: 0, secondStart: 0, okAfterFirst: 0, lastEnd: 0 }
    for (let sent = 1; cut() === undefined && performance.now() < issueUntil; sent++) {
      const start = performance.now()
      if (sent === 2) tally.secondStart = start - stepStart
      step.sent++
      const outcome = await send(false)
      if (outcome.kind === 'cancelled') break
      const end = performance.now()
      tally.answered++
      tally.lastEnd = end - stepStart
      if (outcome.kind === 'error') {
        step.errors++
        step.errorCodes[outcome.code] = (step.errorCodes[outcome.code] ?? 0) + 1
        // A refused connection fails at once: do not spin on it.
        await new Promise((resolve) => setTimeout(resolve, ERROR_PAUSE_MS))
        continue
      }
      step.statuses[outcome.status] = (step.statuses[outcome.status] ?? 0) + 1
      if (isExpected(outcome.status)) {
        step.ok++
        if (sent === 1) {
          samples.warmUp.push(end - start)
        } else {
          samples.steady.push(end - start)
          tally.okAfterFirst++
        }
      } else {
        step.otherStatus++
      }
    }
    return tally
  }

  const runStep = async (concurrency: number, phase: Step['phase']): Promise<Step> => {
    const step: Step = {
      concurrency,
      phase,
      durationMs: 0,
      sent: 0,
      ok: 0,
      otherStatus: 0,
      errors: 0,
      statuses: {},
      errorCodes: {},
      throughput: 0,
      latency: null,
      toolCpu: 0,
      idleSlots: 0,
      partial: false
    }
    const samples: Samples = { warmUp: [], steady: [] }
    const cpu = process.cpuUsage()
    const stepStart = performance.now()
    const issueUntil = stepStart + options.stepMs
    const tallies = await Promise.all(Array.from({ length: concurrency }, () => slot(stepStart, issueUntil, step, samples)))
    const wallMs = performance.now() - stepStart
    const used = process.cpuUsage(cpu)
    step.toolCpu = (used.user + used.system) / 1000 / wallMs
    // Throughput: successful answers over the time the slots spent on them,
    // times N. Each slot is timed from its second request to its last
    // answer: the first request is a warm-up (all N arrive at once, so the
    // first served have short cycles and the last long ones; connections are
    // set up) and every request sent is waited for, so none is cut off at
    // the boundary. Counting the answers in a window instead is off by up to
    // N requests when a request is long beside the step.
    let okAnswers = 0
    let slotMs = 0
    for (const tally of tallies) {
      if (tally.answered === 0) step.idleSlots++
      if (tally.answered > 1) {
        okAnswers += tally.okAfterFirst
        slotMs += tally.lastEnd - tally.secondStart
      }
      step.durationMs = Math.max(step.durationMs, tally.lastEnd)
    }
    if (slotMs > 0) {
      step.throughput = concurrency * okAnswers / (slotMs / 1000)
    } else if (step.durationMs > 0) {
      // One answer per slot: the step was shorter than a cycle.
      step.throughput = step.ok / (step.durationMs / 1000)
    }
    step.partial = hard.signal.aborted || (remaining <= 0 && performance.now() - stepStart < options.stepMs)
    // Latency after the warm-up, like throughput; the warm-up's if that is all there is.
    const latencies = samples.steady.length > 0 ? samples.steady : samples.warmUp
    if (latencies.length > 0) {
      latencies.sort((a, b) => a - b)
      step.latency = { p50: percentile(latencies, 0.5), p99: percentile(latencies, 0.99), max: latencies[latencies.length - 1] }
    }
    options.onStep?.(step)
    return step
  }

  const steps: Step[] = []
  let stoppedBy: StopReason | undefined
  let growing = false
  let preflight: Preflight = { ok: false, latencyMs: 0 }
  try {
    // One request alone first: a wrong URL or a 404 ends it before any load.
    const start = performance.now()
    const first = await send(true)
    preflight.latencyMs = performance.now() - start
    if (first.kind === 'answer') {
      const ok = isExpected(first.status)
      preflight = { ...preflight, ok, status: first.status, body: ok ? undefined : first.body }
    } else if (first.kind === 'error') {
      preflight.error = first.code
    }
    if (!preflight.ok) stoppedBy = cut() ?? 'preflight'

    for (const level of stoppedBy === undefined ? options.levels : []) {
      stoppedBy = cut() ?? (noTimeFor() ? 'time' : undefined)
      if (stoppedBy !== undefined) break
      steps.push(await runStep(level, 'sweep'))
      const reading = trend(steps)
      growing = reading.growing
      stoppedBy = hard.signal.aborted ? hard.signal.reason as StopReason : reading.stop
      if (stoppedBy !== undefined) break
    }
    stoppedBy ??= cut() ?? 'max'

    // Then bisect between the knee and the level below it.
    if (['knee', 'errors', 'max'].includes(stoppedBy)) {
      for (let level = nextRefinement(steps, growing); level !== undefined; level = nextRefinement(steps, growing)) {
        if (cut() !== undefined || noTimeFor()) break
        steps.push(await runStep(level, 'refine'))
      }
      // Ctrl-C during the refinement still means Ctrl-C.
      if (cut() === 'interrupted') stoppedBy = 'interrupted'
    }
  } finally {
    clearTimeout(deadlineTimer)
    options.signal?.removeEventListener('abort', onAbort)
    hard.signal.removeEventListener('abort', cancelAll)
    agent.destroy()
  }
  return {
    steps,
    stoppedBy,
    growing,
    preflight,
    requests: options.maxRequests - remaining,
    elapsedMs: performance.now() - started
  }
}

/** An error's code (ECONNREFUSED, ECONNRESET, 'timeout'), else its message. */
export function errorCode (err: NodeJS.ErrnoException): string {
  return err.code ?? err.message
}

/** Nearest-rank percentile of sorted samples. */
export function percentile (sorted: readonly number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]
}

/** The doubling levels 1, 2, 4, ... up to max, max included. */
export function levelsUpTo (max: number): number[] {
  const levels: number[] = []
  for (let level = 1; level < max; level *= 2) levels.push(level)
  levels.push(max)
  return levels
}
