import { closedLoop } from '../closedloop.js'
import { capacity, checkGate } from '../gate.js'
import { progress, settingsBase as base, withTarget } from '../lab.js'
import { openLoop } from '../openloop.js'
import { byPhase } from './adaptive.js'
import { BOUND_MS, cpuRun, cpuVariants } from './cpu.js'
import { printTable, stepSummary, type Table } from '../report.js'
import type { ServerSettings } from '../server.js'
import { runVariant } from './recycle.js'

export async function ci (): Promise<boolean> {
  // Small enough for a 2-core CI machine to offer 10x capacity in open loop
  // (2,000/s) with room to spare: at 5,000/s (20 ms service time) a busy
  // neighbour on one core starved the server and the generator enough to
  // cost a tenth of the goodput, which is the machine, not the plugin.
  const settings: ServerSettings = { ...base, variant: 'plugin', maxConcurrency: 10, maxQueue: 10, queueTimeout: 200, serviceTime: 50 }
  const cap = capacity(settings.maxConcurrency, settings.serviceTime)
  const { moderate, overload, peakInFlight, serverP99 } = await withTarget(settings, async (target) => {
    // One connection per slot: the most the server carries without a queue,
    // so this both checks a clean run and measures the capacity 10x is held to.
    progress(`gate: closed loop at the limit (${settings.maxConcurrency} connections, 4 s)`)
    const moderate = await closedLoop(`${target.origin}/work`, settings.maxConcurrency, 4)
    const atLimit = await target.stats()
    progress(`gate: open loop at 10x capacity (${cap * 10}/s, 8 s)`)
    await target.reset()
    const overload = await openLoop({ url: `${target.origin}/work`, rate: cap * 10, durationS: 8, timeoutMs: 1000, connections: 4096 })
    const s = await target.stats()
    progress(`gate: offered ${overload.offeredPerS.toFixed(0)}/s, 2xx ${overload.ok}, 503 ${overload.rejected}, client timeouts ${overload.timeouts}, generator lag p99 ${overload.generatorLagP99Ms.toFixed(1)} ms`)
    return { moderate, overload, peakInFlight: Math.max(atLimit.peakInFlight, s.peakInFlight), serverP99: s.okLatency.p99 }
  })
  // The machine's floor for the timeout check: the same load against a bare
  // node:http server that answers every request with a fixed 503 at once.
  progress(`gate: the same open loop against a fixed-503 node:http server (${cap * 10}/s, 8 s)`)
  const floor = await withTarget({ ...settings, variant: 'raw' }, async (target) => {
    return await openLoop({ url: `${target.origin}/work`, rate: cap * 10, durationS: 8, timeoutMs: 1000, connections: 4096 })
  })
  progress(`gate: fixed-503 server: 503 ${floor.rejected}, client timeouts ${floor.timeouts}, generator lag p99 ${floor.generatorLagP99Ms.toFixed(1)} ms`)
  // Retry storm: the plugin against bare Fastify in the same run, and against
  // its own server at its limit (one connection per slot: no queue, no
  // refusal) just before and just after the storm. A 20 ms timer fires late,
  // so that capacity is about a tenth under the nominal 5,000/s, more on a
  // busy machine; holding the storm to the nominal failed one run in four.
  const stormSettings: ServerSettings = { ...base, maxConcurrency: 100, maxQueue: 100, queueTimeout: 1000, serviceTime: 20 }
  const stormConnections = 1000
  // Where one refusal per connection per hold still fills the loop.
  const wideStormConnections = 5000
  progress(`gate: retry storm, bare (${stormConnections} connections, 8 s)`)
  const bareStorm = await withTarget({ ...stormSettings, variant: 'bare' }, async (target) => (await closedLoop(`${target.origin}/work`, stormConnections, 8)).okPerS)
  const pluginStorm = await withTarget({ ...stormSettings, variant: 'plugin' }, async (target) => {
    const atLimit = async (when: string) => {
      progress(`gate: retry storm, plugin at its limit ${when} (${stormSettings.maxConcurrency} connections, 4 s)`)
      return (await closedLoop(`${target.origin}/work`, stormSettings.maxConcurrency, 4)).okPerS
    }
    const before = await atLimit('before')
    progress(`gate: retry storm, plugin (${stormConnections} connections, 8 s)`)
    const okPerS = (await closedLoop(`${target.origin}/work`, stormConnections, 8)).okPerS
    progress(`gate: retry storm, plugin (${wideStormConnections} connections, 8 s)`)
    const wideOkPerS = (await closedLoop(`${target.origin}/work`, wideStormConnections, 8)).okPerS
    const after = await atLimit('after')
    return { before, okPerS, wideOkPerS, after }
  })
  // A CPU-bound route: the in-flight count never rises, the event-loop bound
  // must keep the loop serving.
  const cpuPlugin = cpuVariants().find((v) => v.settings.variant === 'plugin')?.settings as ServerSettings
  progress('gate: CPU-bound route behind maxEventLoopDelay, capacity (4 connections, 3 s), then 5x in open loop (6 s)')
  const { result: cpu } = await cpuRun(cpuPlugin, 5, 6)
  progress(`gate: CPU route capacity ${cpu.capacityPerS.toFixed(0)}/s, goodput at 5x ${cpu.goodputPerS.toFixed(0)}/s, 503 ${cpu.refused}, client timeouts ${cpu.timeouts}, event-loop delay p99 ${cpu.serverEldP99.toFixed(1)} ms`)
  // An adaptive limit, nothing else set, while the downstream's capacity
  // steps down from 20 to 5 parallel calls.
  const steps: Array<[number, number]> = [[0, 20], [6, 5]]
  progress('gate: adaptive limit, downstream of 20 then 5 parallel calls of 50 ms, 1,200/s for 12 s')
  const adaptivePhases = await withTarget({ ...base, variant: 'plugin', serviceTime: 50, downstreamConcurrency: 20, downstreamSchedule: steps, pluginOnly: true, plugin: { adaptive: true } }, async (target) => {
    await target.reset()
    const res = await openLoop({ url: `${target.origin}/work`, rate: 1200, durationS: 12, timeoutMs: 1000, connections: 2048 })
    return byPhase(res, await target.stats(), steps, 6)
  })
  progress(`gate: adaptive ${adaptivePhases.map((p) => `N=${p.slots}: ${p.goodputPct.toFixed(1)}%, p99 ${p.p99Server.toFixed(0)} ms`).join('; ')}`)
  const checks = checkGate({
    ...settings,
    latencyMarginMs: 100,
    peakInFlight,
    measuredCapacityPerS: moderate.okPerS,
    // Latency of admitted requests as the server sees it, from arrival to the
    // last byte: the client's figure adds its own queueing for a connection.
    overload: { goodputPerS: overload.goodputPerS, p99OkMs: serverP99, clientP99OkMs: overload.latencyOk.p99, errors: overload.errors, refused: overload.rejected, timeouts: overload.timeouts },
    maxTimeoutRatio: 0.01,
    floor: { refused: floor.rejected, timeouts: floor.timeouts },
    // The lab's 8 s runs measured 78-100%; a 6 s run weighs the first
    // second's transient more. The check is there to catch a collapse
    // (42-60% before turns were held short while shedding).
    cpu: { eventLoopDelayP99Ms: cpu.serverEldP99, boundMs: BOUND_MS, maxRatio: 1.5, goodputPerS: cpu.goodputPerS, capacityPerS: cpu.capacityPerS, minGoodputRatio: 0.6 },
    adaptive: { goodputRatios: adaptivePhases.map((p) => p.goodputPct / 100), minRatio: 0.8 },
    moderate: { errors: moderate.errors, timeouts: moderate.timeouts, non2xx: Math.round(moderate.rejectedPerS * moderate.durationS) },
    minGoodputRatio: 0.9,
    storm: {
      bareOkPerS: bareStorm,
      pluginOkPerS: pluginStorm.okPerS,
      capacityBeforePerS: pluginStorm.before,
      capacityAfterPerS: pluginStorm.after,
      ideal: capacity(stormSettings.maxConcurrency, stormSettings.serviceTime),
      minRatio: 0.8,
      // The lab measured 90.7-105.0% with the default rejectDelay of 4000
      // (85.9-98.0% with 1000), timed from the moment autocannon's clients
      // are built; 9% when the brake let go of such a storm.
      wide: { connections: wideStormConnections, pluginOkPerS: pluginStorm.wideOkPerS, minRatio: 0.5 }
    }
  })
  // Worker recycling: a few recycles in a short run, counted, never timed.
  const recycleRate = 1000
  progress(`gate: worker recycling (2 workers, maxRequests ${recycleRate}, ${recycleRate}/s, 10 s)`)
  const recycling = await runVariant('requests', 10, recycleRate, 0, { maxRequests: recycleRate, maxRequestsJitter: recycleRate / 5 })
  checks.push({
    name: 'worker recycling: no failed request across >= 3 recycles',
    pass: recycling.failed === 0 && recycling.recycles.length >= 3 && recycling.cut.inFlight === 0,
    detail: `${recycling.recycles.length} recycles, ${recycling.ok} answered, ${recycling.failed} failed ${JSON.stringify(recycling.failures)}, ${recycling.cut.inFlight} cut at the end`
  })
  const table: Table = { title: 'Load-test gate', columns: ['check', 'result', 'figures'], rows: checks.map((c) => [c.name, c.pass ? 'pass' : 'FAIL', c.detail]) }
  printTable(table)
  stepSummary([table])
  const failed = checks.filter((c) => !c.pass).length
  console.log(`gate: ${checks.length - failed} passed, ${failed} failed`)
  return failed === 0
}
