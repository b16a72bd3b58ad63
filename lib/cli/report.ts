// What `tune` prints: one report object, as text for a person or as JSON.
import { MAX_CONCURRENCY, type TuneFlags } from './args.js'
import { failed, findKnee, MIN_QUEUE_TIMEOUT, recommend, TOOL_BUSY, type Recommendation, type Step } from './knee.js'
import { statusMatcher, type Preflight, type StopReason, type SweepResult } from './sweep.js'

export interface KneeSummary {
  concurrency: number
  throughput: number
  /** Throughput at the knee over the best throughput. */
  share: number
  best: { concurrency: number, throughput: number }
  below?: { concurrency: number, throughput: number, share: number }
  /** The last usable level above the knee: what more in flight bought. */
  beyond?: { concurrency: number, throughput: number, p50Ms: number, p50Ratio: number }
}

export interface TuneReport {
  target: { method: string, url: string, expectStatus: string }
  bounds: { levels: number[], stepSeconds: number, maxSeconds: number, maxRequests: number, timeoutMs: number }
  stoppedBy: StopReason
  elapsedSeconds: number
  requests: number
  preflight: Preflight
  /** In the order measured. */
  steps: Step[]
  knee?: KneeSummary
  recommendation?: Recommendation
  /** The plugin options to paste. */
  config?: { maxConcurrency: number, maxQueue: number, queueTimeout: number }
  maxWaitMs?: number
  warnings: string[]
}

/** Few answers make a shaky p99. */
const FEW_SAMPLES = 100

const STOPPED: Record<StopReason, string> = {
  knee: 'throughput stopped growing and latency climbed',
  errors: 'a level failed (errors or unexpected statuses)',
  max: 'every level up to --max was measured',
  time: '--max-seconds reached',
  requests: '--max-requests reached',
  interrupted: 'interrupted',
  preflight: 'the first request failed'
}

/** The URL as shown: a password in it is masked. */
export function shownUrl (url: URL): string {
  if (url.password === '') return url.href
  const masked = new URL(url.href)
  masked.password = '***'
  return masked.href
}

export function buildReport (flags: TuneFlags, result: SweepResult): TuneReport {
  const { steps } = result
  const found = findKnee(steps)
  const recommendation = recommend(steps, { growing: result.growing, maxWaitMs: flags.maxWaitMs })
  const report: TuneReport = {
    target: { method: flags.method, url: shownUrl(flags.url), expectStatus: flags.expectStatus },
    bounds: {
      levels: flags.levels,
      stepSeconds: flags.stepSeconds,
      maxSeconds: flags.maxSeconds,
      maxRequests: flags.maxRequests,
      timeoutMs: flags.timeoutMs
    },
    stoppedBy: result.stoppedBy,
    elapsedSeconds: result.elapsedMs / 1000,
    requests: result.requests,
    preflight: result.preflight,
    steps,
    knee: undefined,
    recommendation: undefined,
    config: undefined,
    maxWaitMs: flags.maxWaitMs,
    warnings: []
  }
  const warn = (text: string): void => { report.warnings.push(text) }

  if (found !== undefined && recommendation !== undefined) {
    const { knee, best, below, above } = found
    const last = above.at(-1)
    report.knee = {
      concurrency: knee.concurrency,
      throughput: knee.throughput,
      share: knee.throughput / best.throughput,
      best: { concurrency: best.concurrency, throughput: best.throughput },
      below: below === undefined
        ? undefined
        : { concurrency: below.concurrency, throughput: below.throughput, share: below.throughput / best.throughput },
      beyond: last === undefined
        ? undefined
        : { concurrency: last.concurrency, throughput: last.throughput, p50Ms: last.latency.p50, p50Ratio: last.latency.p50 / knee.latency.p50 }
    }
    report.recommendation = recommendation
    report.config = {
      maxConcurrency: recommendation.maxConcurrency,
      maxQueue: recommendation.maxQueue,
      queueTimeout: recommendation.queueTimeout
    }
    if (recommendation.atLeast) {
      const more = result.stoppedBy === 'max'
        ? `rerun with --max ${Math.min(knee.concurrency * 4, MAX_CONCURRENCY)}`
        : result.stoppedBy === 'interrupted'
          ? 'let a rerun go on longer'
          : 'rerun with more --max-seconds or --max-requests'
      warn(`Throughput still grew at concurrency ${knee.concurrency}, the largest level measured: the knee is there or higher (${more}).`)
    }
    if (knee.ok < FEW_SAMPLES) {
      warn(`p99 at the knee comes from ${knee.ok} answers only: a longer --step-seconds gives a steadier figure.`)
    }
  }

  const busy = steps.find((step) => step.toolCpu >= TOOL_BUSY)
  if (busy !== undefined) {
    warn(`This tool used ${percent(busy.toolCpu)} of a CPU core at concurrency ${busy.concurrency}: from there on the curve may show the load generator's limit, not the endpoint's. Give the server other cores, or tune from another machine (--i-own-this-host).`)
  }
  const broken = steps.find(failed)
  if (broken !== undefined) {
    const answered = broken.ok + broken.otherStatus + broken.errors
    const expected = statusMatcher(flags.expectStatus) as (status: number) => boolean
    const causes = [
      ...Object.entries(broken.errorCodes),
      ...Object.entries(broken.statuses).filter(([status]) => !expected(Number(status)))
    ].map(([cause, count]) => `${cause} x${count}`)
    warn(`At concurrency ${broken.concurrency}, ${broken.otherStatus + broken.errors} of ${answered} requests failed (${causes.join(', ')}). If the endpoint already has a concurrency limit or a rate limit, its refusals end the sweep: tune with it off or far above --max.`)
  }
  const idle = steps.find((step) => step.idleSlots > 0 && !failed(step))
  if (idle !== undefined) {
    warn(`At concurrency ${idle.concurrency}, ${idle.idleSlots} of ${idle.concurrency} request slots got no answer in the step: the endpoint is slower than --step-seconds allows; raise it.`)
  }
  if (['time', 'requests', 'interrupted'].includes(result.stoppedBy) && steps.length > 0) {
    warn(`The sweep was cut short (${STOPPED[result.stoppedBy]}): the recommendation comes from the levels measured so far.`)
  }
  return report
}

const thousands = (n: number): string => String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, ',')

/** Requests per second: 1 decimal under 100, whole above. */
export function rate (n: number): string {
  return n < 100 ? n.toFixed(1) : thousands(n)
}

/** Milliseconds: 2 decimals under 10, 1 under 100, whole above. */
export function ms (n: number): string {
  return n < 10 ? n.toFixed(2) : n < 100 ? n.toFixed(1) : thousands(n)
}

function percent (share: number): string {
  return `${Math.round(share * 100)}%`
}

/** A share of the best throughput, rounded down: 94.7% must not read as the 95% it missed. */
function shareOfBest (share: number): string {
  return `${Math.floor(share * 100 + 1e-9)}%`
}

const CHART_WIDTH = 40
const LATENCY_WIDTH = 24

function bar (value: number, top: number, width: number): string {
  return '#'.repeat(top > 0 ? Math.round((value / top) * width) : 0)
}

/** The text a person reads. */
export function renderText (report: TuneReport): string {
  const out: string[] = []
  const line = (text = ''): void => { out.push(text) }
  const { target, preflight } = report
  const okLabel = target.expectStatus === '2xx' ? '2xx' : 'ok'
  const otherLabel = target.expectStatus === '2xx' ? 'non-2xx' : 'other'

  if (report.steps.length === 0) {
    const { bounds } = report
    if (preflight.error !== undefined) {
      line(`The first request to ${target.method} ${target.url} failed: ${preflight.error}. Is the server running there? Nothing was swept.`)
    } else if (preflight.status !== undefined && !preflight.ok) {
      line(`The first request to ${target.method} ${target.url} was answered ${preflight.status}, not ${target.expectStatus}. Nothing was swept.`)
      line('Check the URL, --method, --header and --body, or say which statuses are success with --expect-status.')
      if (preflight.body !== undefined && preflight.body !== '') line(`The answer began: ${preflight.body.replace(/\s+/g, ' ').trim()}`)
    } else if (report.stoppedBy === 'interrupted') {
      line('Interrupted before any level was measured.')
    } else if (!preflight.ok) {
      // Cut by --max-seconds while the first request waited for its answer.
      line(`The first request to ${target.method} ${target.url} got no answer within --max-seconds (${bounds.maxSeconds} s). ` +
        'Is the server answering? Nothing was swept.')
    } else if (report.stoppedBy === 'requests') {
      line(`--max-requests (${bounds.maxRequests}) left no request for a level after the first. Nothing was swept.`)
    } else {
      line(`--max-seconds (${bounds.maxSeconds} s) left no time for a level of --step-seconds (${bounds.stepSeconds} s) after the first request. Nothing was swept.`)
    }
    return out.join('\n') + '\n'
  }

  const steps = [...report.steps].sort((a, b) => a.concurrency - b.concurrency)
  const kneeAt = report.knee?.concurrency
  line(`Measured: ${target.method} ${target.url}, ${report.steps.length} levels in ${report.elapsedSeconds.toFixed(1)} s, ${thousands(report.requests)} requests; stopped: ${STOPPED[report.stoppedBy]}.`)
  line()
  const head = ['concurrency', `${okLabel}/s`, 'p50 ms', 'p99 ms', 'errors', otherLabel, 'tool cpu']
  const rows = steps.map((step) => {
    const notes = [
      step.concurrency === kneeAt ? '<- knee' : '',
      step.phase === 'refine' ? 'refined' : '',
      step.partial ? 'partial' : '',
      failed(step) ? 'failed' : ''
    ].filter(Boolean).join(', ')
    return [
      String(step.concurrency),
      rate(step.throughput),
      step.latency === null ? '-' : ms(step.latency.p50),
      step.latency === null ? '-' : ms(step.latency.p99),
      thousands(step.errors),
      thousands(step.otherStatus),
      percent(step.toolCpu),
      notes
    ]
  })
  const widths = head.map((title, i) => Math.max(title.length, ...rows.map((row) => row[i].length)))
  const format = (cells: string[]): string => '  ' + cells.map((cell, i) => i < head.length ? cell.padStart(widths[i]) : cell).join('   ').trimEnd()
  line(format(head))
  for (const row of rows) line(format(row))
  line()

  const topRate = Math.max(...steps.map((step) => step.throughput))
  const topP99 = Math.max(...steps.map((step) => step.latency?.p99 ?? 0))
  const concurrencyWidth = Math.max(...steps.map((step) => String(step.concurrency).length), 'in flight'.length)
  line(`  ${'in flight'.padStart(concurrencyWidth)}   ${`${okLabel}/s, 0 to ${rate(topRate)}`.padEnd(CHART_WIDTH)}   p99, 0 to ${ms(topP99)} ms`)
  for (const step of steps) {
    const marker = step.concurrency === kneeAt ? ' <- knee' : ''
    line(`  ${String(step.concurrency).padStart(concurrencyWidth)} | ${bar(step.throughput, topRate, CHART_WIDTH).padEnd(CHART_WIDTH)} | ${bar(step.latency?.p99 ?? 0, topP99, LATENCY_WIDTH).padEnd(LATENCY_WIDTH)} |${marker}`)
  }
  line()

  const { knee, recommendation: r, config } = report
  if (knee === undefined || r === undefined || config === undefined) {
    line('No recommendation: no level was measured without failures.')
  } else {
    const S = ms(r.serviceTimeMs)
    line(`Knee: ${knee.concurrency} in flight reached ${rate(knee.throughput)}/s, ${shareOfBest(knee.share)} of the best (${rate(knee.best.throughput)}/s at ${knee.best.concurrency})` +
      (knee.below === undefined ? '.' : `; ${knee.below.concurrency} reached ${shareOfBest(knee.below.share)}.`))
    if (knee.beyond !== undefined) {
      line(`Past it, more in flight only waited: at ${knee.beyond.concurrency}, ${rate(knee.beyond.throughput)}/s with p50 ${ms(knee.beyond.p50Ms)} ms (${knee.beyond.p50Ratio.toFixed(1)}x the knee's).`)
    }
    line()
    line('Recommendation, by Little\'s law (requests in flight = throughput x time each spends):')
    line(`  maxConcurrency ${config.maxConcurrency}${r.atLeast ? ' (at least)' : ''}: the knee. Service time there S = ${r.maxConcurrency} / ${rate(r.capacity)}/s = ${S} ms (p50 measured ${ms(r.p50Ms)} ms),`)
    line(`    so the pool's capacity is maxConcurrency / S = ${rate(r.capacity)}/s; more in flight adds wait, not throughput.`)
    if (report.maxWaitMs === undefined) {
      line(`  maxQueue ${config.maxQueue}: a full queue waits ${config.maxQueue} x S / ${r.maxConcurrency} = ${ms(r.queueWaitMs)} ms, one service time: it absorbs a burst, not an overload.`)
    } else {
      line(`  maxQueue ${config.maxQueue}: the --max-wait budget of ${ms(report.maxWaitMs)} ms x ${rate(r.capacity)}/s, rounded down; a full queue waits ${config.maxQueue} x S / ${r.maxConcurrency} = ${ms(r.queueWaitMs)} ms.`)
    }
    line(`  queueTimeout ${config.queueTimeout}: p99 at the knee ${ms(r.p99Ms)} ms + a full queue's wait ${ms(r.queueWaitMs)} ms = ${ms(r.queueTimeoutExactMs)} ms, rounded up` +
      (r.queueTimeoutExactMs < MIN_QUEUE_TIMEOUT ? ` to ${MIN_QUEUE_TIMEOUT} ms (the plugin reads 1 to 99 ms as a likely unit mistake).` : '.'))
    line()
    line('  await app.register(concurrencyLimit, {')
    line(`    maxConcurrency: ${config.maxConcurrency},`)
    line(`    maxQueue: ${config.maxQueue},`)
    line(`    queueTimeout: ${config.queueTimeout}`)
    line('  })')
    line()
    line('Measured for this one route from one client. The plugin\'s default pool is shared by every route it limits:')
    line('give this route a pool of its own (config: { concurrencyLimit: { maxConcurrency, ... } }) or tune for the mix.')
  }
  for (const warning of report.warnings) {
    line()
    line(`Note: ${warning}`)
  }
  return out.join('\n') + '\n'
}

/** One line per step while the sweep runs. */
export function progressLine (step: Step): string {
  const latency = step.latency === null ? 'no successful answer' : `p50 ${ms(step.latency.p50)} ms, p99 ${ms(step.latency.p99)} ms`
  const bad = step.errors + step.otherStatus
  return `  ${String(step.concurrency).padStart(5)} in flight: ${rate(step.throughput)}/s, ${latency}` +
    (bad > 0 ? `, ${bad} failed` : '') + (step.phase === 'refine' ? ' (refining)' : '') + '\n'
}

/** What `tune` says before it sends anything. */
export function banner (flags: TuneFlags): string {
  const levels = flags.levels.length > 6
    ? `${flags.levels.slice(0, 4).join(', ')}, ... ${flags.levels.at(-1)}`
    : flags.levels.join(', ')
  return `tune: ${flags.method} ${shownUrl(flags.url)} (success: ${flags.expectStatus})\n` +
    `  concurrency ${levels}, ${flags.stepSeconds} s each, then levels between the knee and the one below it;\n` +
    `  stops at the knee, on failures, or after ${flags.maxSeconds} s or ${thousands(flags.maxRequests)} requests (timeout ${thousands(flags.timeoutMs)} ms each).\n` +
    '  Ctrl-C stops and prints what was measured.\n'
}
