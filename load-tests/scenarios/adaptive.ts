// Adaptive limits against a downstream whose capacity changes: N parallel
// calls of 50 ms with an unbounded queue of their own (a database pool), N
// going 20 -> 5 -> 40 at a constant offered 1,200/s; static limits beside.
import { machine, num, progress, round, settingsBase, withTarget } from '../lab.js'
import { openLoop, type OpenLoopResult } from '../openloop.js'
import type { ScenarioResult, Series, Table } from '../report.js'
import type { ServerSettings, ServerStats } from '../server.js'
import { median, summarize } from '../stats.js'
import { undisturbed } from './pooled-client.js'

const SERVICE_MS = 50
const PHASE_S = 10
const PHASES: Array<[number, number]> = [[0, 20], [PHASE_S, 5], [2 * PHASE_S, 40]]
const RATE = 1200
/** Seconds at the start of a phase left out of its figures: the time allowed to converge. */
const SETTLE_S = 2
const DRIFT_S = 60

const phaseCapacity = (slots: number) => slots * 1000 / SERVICE_MS

export interface PhaseRun {
  slots: number
  goodputPct: number
  p99Server: number
  refusedPerS: number
  timeoutsPerS: number
}

export function byPhase (res: OpenLoopResult, s: ServerStats, phases = PHASES, phaseS = PHASE_S): PhaseRun[] {
  return phases.map(([atS, slots]) => {
    const from = atS + SETTLE_S
    const to = atS + phaseS
    const buckets = res.series.filter((b) => b.t >= from && b.t < to)
    const mean = (f: (b: typeof buckets[number]) => number) => buckets.reduce((sum, b) => sum + f(b), 0) / Math.max(1, buckets.length)
    const latencies = (s.oks ?? []).filter(([at]) => at >= from * 1000 && at < to * 1000).map(([, ms]) => ms)
    return {
      slots,
      goodputPct: 100 * mean((b) => b.goodputPerS) / phaseCapacity(slots),
      p99Server: summarize(latencies).p99,
      refusedPerS: mean((b) => b.rejectedPerS),
      timeoutsPerS: mean((b) => b.timeoutsPerS)
    }
  })
}

export async function adaptive (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const timeoutMs = num('client-timeout')
  const base: ServerSettings = { ...settingsBase, serviceTime: SERVICE_MS, downstreamConcurrency: PHASES[0][1], downstreamSchedule: PHASES, maxConcurrency: 100, maxQueue: 100, queueTimeout: 1000 }
  const variants: Array<{ name: string, settings: ServerSettings }> = [
    { name: 'bare Fastify', settings: { ...base, variant: 'bare' } },
    { name: 'static maxConcurrency 20', settings: { ...base, variant: 'plugin', maxConcurrency: 20, maxQueue: 20 } },
    { name: 'static maxConcurrency 100 (default)', settings: { ...base, variant: 'plugin' } },
    { name: 'adaptive: true', settings: { ...base, variant: 'plugin', pluginOnly: true, plugin: { adaptive: true } } }
  ]
  const runs = new Map<string, PhaseRun[][]>()
  let limitSeries: Series[] = []
  for (let r = 0; r < repeats; r++) {
    for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
      const { result } = await undisturbed(`adaptive, ${v.name}`, async () => withTarget(v.settings, async (target) => {
        await target.reset()
        const res = await openLoop({ url: `${target.origin}/work`, rate: RATE, durationS: PHASES.length * PHASE_S, timeoutMs, connections: 2048 })
        const s = await target.stats()
        return { result: { phases: byPhase(res, s), timeline: s.timeline ?? [] }, serverCpuS: s.cpuMicros / 1e6 }
      }))
      runs.set(v.name, [...(runs.get(v.name) ?? []), result.phases])
      progress(`adaptive, ${v.name} ${r + 1}/${repeats}: ` + result.phases.map((p) =>
        `N=${p.slots}: ${p.goodputPct.toFixed(1)}% goodput, p99 ${p.p99Server.toFixed(0)} ms, ${p.refusedPerS.toFixed(0)} 503/s, ${p.timeoutsPerS.toFixed(0)} timeouts/s`).join('; '))
      if (v.name === 'adaptive: true' && r === 0) {
        const points = (i: number) => result.timeline.map((row): [number, number] => [row[0] / 1000, row[i]])
        limitSeries = [
          { name: 'limit', points: points(1) },
          { name: 'in flight', points: points(2) },
          { name: "downstream's N", points: points(3) }
        ]
      }
    }
  }

  // 0.3x of the first phase: nothing to refuse. 2x for a minute: does the limit drift?
  const steady: ServerSettings = { ...base, variant: 'plugin', downstreamSchedule: [[0, PHASES[0][1]]], pluginOnly: true, plugin: { adaptive: true } }
  const { result: light } = await undisturbed('adaptive, 0.3x', async () => withTarget(steady, async (target) => {
    await target.reset()
    const res = await openLoop({ url: `${target.origin}/work`, rate: 0.3 * phaseCapacity(PHASES[0][1]), durationS: PHASE_S, timeoutMs, connections: 256 })
    const s = await target.stats()
    return { result: { refused: res.rejected, timeouts: res.timeouts, goodputPct: 100 * res.ok / Math.max(1, res.offered) }, serverCpuS: s.cpuMicros / 1e6 }
  }))
  progress(`adaptive, 0.3x: ${light.refused} refusals, ${light.timeouts} timeouts, ${light.goodputPct.toFixed(1)}% of requests served`)
  const { result: drift } = await undisturbed('adaptive, 2x for a minute', async () => withTarget(steady, async (target) => {
    await target.reset()
    const res = await openLoop({ url: `${target.origin}/work`, rate: 2 * phaseCapacity(PHASES[0][1]), durationS: DRIFT_S, timeoutMs, connections: 2048 })
    const s = await target.stats()
    const limits = (s.timeline ?? []).map(([ms, limit]) => [ms / 1000, limit])
    const at = (sec: number) => median(limits.filter(([t]) => t >= sec - 1 && t < sec).map(([, l]) => l))
    const tail = limits.filter(([t]) => t >= 10).map(([, l]) => l)
    const mean = tail.reduce((a, b) => a + b, 0) / Math.max(1, tail.length)
    const cv = Math.sqrt(tail.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, tail.length)) / mean
    return { result: { at10: at(10), atEnd: at(DRIFT_S), cv, goodputPct: 100 * res.goodputPerS / phaseCapacity(PHASES[0][1]) }, serverCpuS: s.cpuMicros / 1e6 }
  }))
  progress(`adaptive, 2x for ${DRIFT_S} s: limit ${drift.at10} at 10 s, ${drift.atEnd} at ${DRIFT_S} s, coefficient of variation ${drift.cv.toFixed(3)} after 10 s, goodput ${drift.goodputPct.toFixed(1)}%`)

  const cell = (name: string, phase: number, field: keyof PhaseRun, digits = 1): string => {
    const values = (runs.get(name) ?? []).map((phases) => phases[phase][field])
    const show = (x: number) => round(x, digits).toFixed(digits)
    return repeats === 1 ? show(values[0]) : `${show(median(values))} (${show(Math.min(...values))}-${show(Math.max(...values))})`
  }
  const rows: Array<Array<string | number>> = []
  for (const v of variants) {
    PHASES.forEach(([, slots], i) => {
      rows.push([v.name, `N=${slots} (${phaseCapacity(slots)}/s)`, cell(v.name, i, 'goodputPct'), cell(v.name, i, 'p99Server'), cell(v.name, i, 'refusedPerS', 0), cell(v.name, i, 'timeoutsPerS', 0)])
    })
  }
  const table: Table = {
    title: `Adaptive limit vs a downstream of N x ${SERVICE_MS} ms whose N changes every ${PHASE_S} s (open loop ${RATE}/s, Poisson, ${timeoutMs} ms client timeout; ` +
      `each phase's figures leave out its first ${SETTLE_S} s; ${repeats === 1 ? 'one run' : `${repeats} runs, median (min-max)`})`,
    columns: ['variant', 'phase', "goodput, % of phase's capacity", 'p99 2xx ms (server)', '503/s', 'client timeouts/s'],
    rows
  }
  const extra: Table = {
    title: 'Adaptive limit at steady load (N = 20, 400/s)',
    columns: ['load', 'figures'],
    rows: [
      ['0.3x for 10 s', `${light.refused} refusals, ${light.timeouts} client timeouts, ${light.goodputPct.toFixed(1)}% of requests served`],
      [`2x for ${DRIFT_S} s`, `limit ${drift.at10} at 10 s, ${drift.atEnd} at ${DRIFT_S} s; coefficient of variation after 10 s ${drift.cv.toFixed(3)}; goodput ${drift.goodputPct.toFixed(1)}% of 400/s`]
    ]
  }
  return {
    scenario: 'adaptive',
    title: 'Adaptive limits: a downstream whose capacity changes',
    options: { serviceTime: SERVICE_MS, phases: PHASES, rate: RATE, repeats, timeoutMs },
    machine,
    tables: [table, extra],
    charts: limitSeries.length === 0 ? [] : [{ title: "Adaptive limit, in flight and the downstream's N over time", x: 'seconds', y: 'requests', series: limitSeries }],
    data: { runs: Object.fromEntries(runs), light, drift }
  }
}
