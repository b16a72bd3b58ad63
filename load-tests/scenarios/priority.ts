// Priority classes at 10x overload: 5% critical traffic (half the
// capacity), 25% normal, 70% sheddable, open loop, with and without classes.
import { closedLoop } from '../closedloop.js'
import { capacity } from '../gate.js'
import { machine, num, progress, round, settingsBase, withTarget } from '../lab.js'
import { openLoop, type OpenLoopResult } from '../openloop.js'
import type { ScenarioResult, Table } from '../report.js'
import type { ServerSettings } from '../server.js'
import { median } from '../stats.js'
import { undisturbed } from './pooled-client.js'

const DURATION_S = 8
const MULTIPLE = 10
const SHARES = { critical: 0.05, normal: 0.25, sheddable: 0.7 } as const
type Class = keyof typeof SHARES
const CLASSES = Object.keys(SHARES) as Class[]

interface ClassRun {
  offeredPerS: number
  successPct: number
  refused: number
  timeouts: number
  p50: number
  p99: number
}

export async function priority (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const timeoutMs = num('client-timeout')
  const base: ServerSettings = { ...settingsBase, variant: 'plugin', maxConcurrency: 10, maxQueue: 10, queueTimeout: 200, serviceTime: 50, downstreamConcurrency: 10, plugin: { rejectDelay: 0 } }
  const nominal = capacity(base.maxConcurrency, base.serviceTime)
  const variants = [
    { name: 'priorities', settings: { ...base, priorities: true } },
    { name: 'no priorities', settings: { ...base, priorities: false } }
  ]
  const runs = new Map<string, Array<ClassRun & { capacityPerS: number, goodputPct: number }>>()
  for (let r = 0; r < repeats; r++) {
    for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
      const { result } = await undisturbed(`priority, ${v.name}`, async () => withTarget(v.settings, async (target) => {
        const atLimit = await closedLoop(`${target.origin}/work-normal`, base.maxConcurrency, 3)
        const capacityPerS = Math.min(nominal, atLimit.okPerS)
        const results = await Promise.all(CLASSES.map(async (c) => await openLoop({
          url: `${target.origin}/work-${c}`, rate: capacityPerS * MULTIPLE * SHARES[c], durationS: DURATION_S, timeoutMs, connections: 2048
        })))
        const s = await target.stats()
        return { result: { capacityPerS, results }, serverCpuS: s.cpuMicros / 1e6 }
      }))
      const goodput = result.results.reduce((sum, x) => sum + x.goodputPerS, 0)
      result.results.forEach((res: OpenLoopResult, i) => {
        const c = CLASSES[i]
        const run = {
          capacityPerS: result.capacityPerS,
          goodputPct: 100 * goodput / result.capacityPerS,
          offeredPerS: res.offeredPerS,
          successPct: 100 * res.ok / Math.max(1, res.offered),
          refused: res.rejected,
          timeouts: res.timeouts,
          p50: res.latencyOk.p50,
          p99: res.latencyOk.p99
        }
        const key = `${v.name}|${c}`
        runs.set(key, [...(runs.get(key) ?? []), run])
        progress(`priority, ${v.name} ${r + 1}/${repeats}, ${c}: ${run.offeredPerS.toFixed(0)}/s offered, ${run.successPct.toFixed(1)}% served, ` +
          `503 ${run.refused}, timeouts ${run.timeouts}, p99 2xx ${run.p99.toFixed(1)} ms (client); all classes ${run.goodputPct.toFixed(1)}% of capacity ${result.capacityPerS.toFixed(0)}/s`)
      })
    }
  }
  const cell = (key: string, field: 'offeredPerS' | 'successPct' | 'refused' | 'timeouts' | 'p50' | 'p99' | 'goodputPct', digits = 1): string => {
    const values = (runs.get(key) ?? []).map((run) => run[field])
    const show = (x: number) => round(x, digits).toFixed(digits)
    return repeats === 1 ? show(values[0]) : `${show(median(values))} (${show(Math.min(...values))}-${show(Math.max(...values))})`
  }
  const rows: Array<Array<string | number>> = []
  for (const v of variants) {
    for (const c of CLASSES) {
      const key = `${v.name}|${c}`
      rows.push([v.name, c, `${Math.round(SHARES[c] * 100)}%`, cell(key, 'offeredPerS', 0), cell(key, 'successPct'), cell(key, 'refused', 0), cell(key, 'timeouts', 0), cell(key, 'p50'), cell(key, 'p99'), cell(key, 'goodputPct')])
    }
  }
  const table: Table = {
    title: `Priority classes at ${MULTIPLE}x capacity (open loop, Poisson arrivals, ${timeoutMs} ms client timeout; route of ${base.maxConcurrency} x ${base.serviceTime} ms = ${nominal}/s; ` +
      `plugin maxConcurrency ${base.maxConcurrency}, maxQueue ${base.maxQueue}, queueTimeout ${base.queueTimeout}, rejectDelay 0; ${DURATION_S} s x ${repeats}${repeats === 1 ? '' : ', median (min-max)'})`,
    columns: ['variant', 'class', 'share of traffic', 'offered/s', 'served %', '503', 'client timeouts', 'p50 2xx ms (client)', 'p99 2xx ms (client)', 'goodput, all classes, % of capacity'],
    rows
  }
  return { scenario: 'priority', title: 'Priority classes under overload', options: { ...base, multiple: MULTIPLE, shares: SHARES, duration: DURATION_S, repeats, timeoutMs }, machine, tables: [table], charts: [], data: Object.fromEntries(runs) }
}
