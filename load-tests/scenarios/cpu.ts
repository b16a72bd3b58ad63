// CPU-bound work on the event loop: the number of requests in flight never
// rises (a synchronous handler is one request at a time), so a concurrency
// limit alone never engages. What does the event-loop bound do, against bare
// Fastify and @fastify/under-pressure at the same bound?
import { closedLoop } from '../closedloop.js'
import { machine, num, progress, round, settingsBase, values, withTarget } from '../lab.js'
import { openLoop } from '../openloop.js'
import { openLoopRaw } from '../openloop-raw.js'
import type { ScenarioResult, Series, Table } from '../report.js'
import type { ServerSettings } from '../server.js'
import { median } from '../stats.js'
import { undisturbed } from './pooled-client.js'

/** CPU milliseconds of one request. */
export const CPU_MS = 2
/** The event-loop bound given to the plugin and to under-pressure. */
export const BOUND_MS = 50
const DURATION_S = 8
const CONNECTIONS = 1024
const MULTIPLES = [0.5, 1, 2, 5, 10]

export interface CpuRun {
  capacityPerS: number
  offeredPerS: number
  goodputPerS: number
  goodputPct: number
  refused: number
  timeouts: number
  clientP50: number
  clientP99: number
  /** Arrival (onRequest) to the end of the answer, of 2xx answers: what the server adds. */
  serverP99: number
  serverEldP99: number
  /** Connections the generator opened: each client timeout closes one. */
  connections: number
  /** Generator CPU, in cores over the run. */
  generatorCores: number
  generatorLagP99: number
  othersCores: number
}

export const cpuVariants = (bound = BOUND_MS): Array<{ name: string, settings: ServerSettings }> => {
  const base: ServerSettings = { ...settingsBase, cpuMs: CPU_MS, maxConcurrency: 100, maxQueue: 100, queueTimeout: 1000 }
  return [
    { name: 'bare Fastify', settings: { ...base, variant: 'bare' } },
    { name: `under-pressure, maxEventLoopDelay ${bound}`, settings: { ...base, variant: 'under-pressure', underPressure: { maxEventLoopDelay: bound } } },
    { name: `plugin, maxEventLoopDelay ${bound}`, settings: { ...base, variant: 'plugin', plugin: { maxEventLoopDelay: bound } } }
  ]
}

export type Generator = 'raw' | 'undici'

/** The `--generator` flag: which open-loop generator loads the CPU-bound route. */
export function generatorFlag (): Generator {
  const generator = values.generator
  if (generator !== 'raw' && generator !== 'undici') throw new Error(`--generator: raw or undici, not ${String(generator)}`)
  return generator
}

/**
 * What one server serves of /cpu-sync at `multiple` times its capacity,
 * measured first on the same server by a closed loop of a few connections
 * (nothing is refused there: one request at a time takes the whole loop).
 * The generator is the one on node:net unless told: at 10x undici's took
 * 0.5-1.9 of the machine's 2 cores, and pinned to a core of its own it
 * stalled, so that its figures measured it rather than the server.
 */
export async function cpuRun (settings: ServerSettings, multiple: number, durationS = DURATION_S, timeoutMs = 1000, generator: Generator = 'raw'): Promise<{ result: Omit<CpuRun, 'othersCores'>, serverCpuS: number }> {
  return await withTarget(settings, async (target) => {
    const atLimit = await closedLoop(`${target.origin}/cpu-sync`, 4, 3)
    const capacityPerS = atLimit.okPerS
    await target.reset()
    const load = generator === 'raw' ? openLoopRaw : openLoop
    const res = await load({ url: `${target.origin}/cpu-sync`, rate: capacityPerS * multiple, durationS, timeoutMs, connections: CONNECTIONS })
    const s = await target.stats()
    return {
      result: {
        capacityPerS,
        offeredPerS: res.offeredPerS,
        goodputPerS: res.goodputPerS,
        goodputPct: 100 * res.goodputPerS / capacityPerS,
        refused: res.rejected,
        timeouts: res.timeouts,
        clientP50: res.latencyOk.p50,
        clientP99: res.latencyOk.p99,
        serverP99: s.okLatency.p99,
        serverEldP99: s.eventLoopDelayP99Ms,
        connections: res.connectionsOpened,
        generatorCores: res.generatorCpuS / durationS,
        generatorLagP99: res.generatorLagP99Ms
      },
      serverCpuS: s.cpuMicros / 1e6
    }
  })
}

export async function cpu (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const timeoutMs = num('client-timeout')
  const generator = generatorFlag()
  const variants = cpuVariants()
  const runs = new Map<string, CpuRun[]>()
  for (let r = 0; r < repeats; r++) {
    for (const multiple of MULTIPLES) {
      const order = r % 2 === 0 ? variants : [...variants].reverse()
      for (const v of order) {
        const what = `cpu ${multiple}x, ${v.name}`
        const { result, othersCores } = await undisturbed(what, async () => await cpuRun(v.settings, multiple, DURATION_S, timeoutMs, generator))
        const run: CpuRun = { ...result, othersCores }
        const key = `${multiple}|${v.name}`
        runs.set(key, [...(runs.get(key) ?? []), run])
        progress(`${what} ${r + 1}/${repeats}: capacity ${run.capacityPerS.toFixed(0)}/s, goodput ${run.goodputPct.toFixed(1)}%, 503 ${run.refused}, ` +
          `timeouts ${run.timeouts}, p99 2xx ${run.clientP99.toFixed(1)} ms (client) ${run.serverP99.toFixed(1)} ms (server), connections ${run.connections}, ELD p99 ${run.serverEldP99.toFixed(1)} ms, generator lag p99 ${run.generatorLagP99.toFixed(1)} ms, generator ${run.generatorCores.toFixed(2)} cores, others ${othersCores.toFixed(2)} cores`)
      }
    }
  }
  const cell = (key: string, field: keyof CpuRun, digits = 1): string => {
    const values = (runs.get(key) ?? []).map((run) => run[field])
    const show = (x: number) => round(x, digits).toFixed(digits)
    return repeats === 1 ? show(values[0]) : `${show(median(values))} (${show(Math.min(...values))}-${show(Math.max(...values))})`
  }
  const rows: Array<Array<string | number>> = []
  for (const multiple of MULTIPLES) {
    for (const v of variants) {
      const key = `${multiple}|${v.name}`
      rows.push([`${multiple}x`, v.name, cell(key, 'capacityPerS', 0), cell(key, 'offeredPerS', 0), cell(key, 'goodputPerS', 0), cell(key, 'goodputPct'),
        cell(key, 'refused', 0), cell(key, 'timeouts', 0), cell(key, 'clientP50'), cell(key, 'clientP99'), cell(key, 'serverP99'), cell(key, 'serverEldP99'), cell(key, 'connections', 0), cell(key, 'generatorLagP99'), cell(key, 'generatorCores', 2), cell(key, 'othersCores', 2)])
    }
  }
  const table: Table = {
    title: `CPU-bound route (${CPU_MS} ms of synchronous CPU per request; open loop, Poisson arrivals, ${timeoutMs} ms client timeout, ${CONNECTIONS} connections; ` +
      `capacity measured on each server by a closed loop of 4 connections; generator: ${generator === 'raw' ? 'node:net' : 'undici'}; ${DURATION_S} s x ${repeats}${repeats === 1 ? '' : ', median (min-max)'})`,
    columns: ['load', 'variant', 'capacity/s', 'offered/s', '2xx/s', '% of capacity', '503', 'client timeouts', 'p50 2xx ms (client)', 'p99 2xx ms (client)', 'p99 2xx ms (server)', 'ELD p99 ms (server)', 'connections opened', 'generator lag p99 ms', 'generator, cores', 'other processes, cores'],
    rows
  }
  const series: Series[] = variants.map((v) => ({
    name: v.name,
    points: MULTIPLES.map((m): [number, number | null] => [m, median((runs.get(`${m}|${v.name}`) ?? []).map((run) => run.goodputPct))])
  }))
  return {
    scenario: 'cpu',
    title: 'CPU-bound route: event-loop-aware admission',
    options: { cpuMs: CPU_MS, boundMs: BOUND_MS, duration: DURATION_S, repeats, timeoutMs, connections: CONNECTIONS, generator },
    machine,
    tables: [table],
    charts: [{ title: 'CPU-bound route: goodput, % of measured capacity', x: 'offered load (x capacity)', y: '%', logX: true, series }],
    data: Object.fromEntries(runs)
  }
}
