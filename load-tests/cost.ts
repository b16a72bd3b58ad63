// Server CPU per response of server variants, measured interleaved.
import { closedLoop, closedLoopApart } from './closedloop.js'
import { duration, progress, withTarget } from './lab.js'
import type { ServerSettings } from './server.js'
import { Target } from './target.js'

export interface CostVariant {
  name: string
  settings: ServerSettings
  path: string
  /** Take the saturated pool's only slot first, so that every request is refused. */
  saturate?: boolean
}

/** Server CPU per response of each variant, measured interleaved; medians. */
export async function measureCost (variants: CostVariant[], repeats: number, connections: number): Promise<Map<string, { rps: number[], cpu: number[] }>> {
  const out = new Map(variants.map((v) => [v.name, { rps: [] as number[], cpu: [] as number[] }]))
  for (let r = 0; r < repeats; r++) {
    const order = r % 2 === 0 ? variants : [...variants].reverse()
    for (const v of order) {
      await withTarget(v.settings, async (target) => {
        const holder = new AbortController()
        if (v.saturate === true) {
          fetch(`${target.origin}/saturate`, { signal: holder.signal }).catch(() => {})
          await new Promise((resolve) => setTimeout(resolve, 100))
        }
        await closedLoop(`${target.origin}${v.path}`, connections, 1)
        await target.reset()
        const res = await closedLoop(`${target.origin}${v.path}`, connections, duration)
        const stats = await target.stats()
        holder.abort()
        if (v.settings.variant === 'plugin' && v.saturate !== true && (stats.plugin as { admitted: number }).admitted < res.total) {
          throw new Error('the plugin did not see every request: the benchmark would not measure it')
        }
        const cpu = stats.cpuMicros / Math.max(1, res.total)
        out.get(v.name)?.rps.push(res.total / res.durationS)
        out.get(v.name)?.cpu.push(cpu)
        progress(`${v.name} ${r + 1}/${repeats}: ${(res.total / res.durationS).toFixed(0)} responses/s, ${cpu.toFixed(2)} µs CPU/response`)
      })
    }
  }
  return out
}

/** A variant's figures and, round by round, those of the reference measured beside it. */
export interface PairedCosts {
  rps: number[]
  cpu: number[]
  referenceRps: number[]
  referenceCpu: number[]
}

/**
 * Server CPU per response and req/s of each variant, measured at the same
 * time as the reference: two servers, each loaded by a generator of its
 * own. The machine's noise (other processes, a busy neighbour of the VM,
 * frequency changes) then hits both alike, and the ratio of the pair keeps
 * the plugin's cost where sequential runs on a shared machine bury it. The
 * reference against itself (the first variant may be it) shows what noise
 * remains.
 */
export async function measurePaired (reference: CostVariant, variants: CostVariant[], repeats: number, connections: number): Promise<Map<string, PairedCosts>> {
  const out = new Map(variants.map((v) => [v.name, { rps: [] as number[], cpu: [] as number[], referenceRps: [] as number[], referenceCpu: [] as number[] }]))
  for (let r = 0; r < repeats; r++) {
    const order = r % 2 === 0 ? variants : [...variants].reverse()
    for (const v of order) {
      // Each side starts first in every other round.
      const first = await Target.start(r % 2 === 0 ? reference.settings : v.settings)
      const second = await Target.start(r % 2 === 0 ? v.settings : reference.settings)
      const [ref, target] = r % 2 === 0 ? [first, second] : [second, first]
      try {
        const urls = [`${ref.origin}${reference.path}`, `${target.origin}${v.path}`]
        await Promise.all(urls.map((url) => closedLoopApart(url, connections, 1)))
        await Promise.all([ref.reset(), target.reset()])
        const [refRes, res] = await Promise.all(urls.map((url) => closedLoopApart(url, connections, duration)))
        const [refStats, stats] = await Promise.all([ref.stats(), target.stats()])
        if (v.settings.variant === 'plugin' && (stats.plugin as { admitted: number }).admitted < res.total) {
          throw new Error('the plugin did not see every request: the benchmark would not measure it')
        }
        const figures = out.get(v.name) as PairedCosts
        figures.rps.push(res.total / res.durationS)
        figures.cpu.push(stats.cpuMicros / Math.max(1, res.total))
        figures.referenceRps.push(refRes.total / refRes.durationS)
        figures.referenceCpu.push(refStats.cpuMicros / Math.max(1, refRes.total))
        const i = figures.rps.length - 1
        progress(`${v.name} ${r + 1}/${repeats}: ${figures.rps[i].toFixed(0)} responses/s (${reference.name} beside it ${figures.referenceRps[i].toFixed(0)}), ` +
          `${figures.cpu[i].toFixed(2)} µs CPU/response (${figures.referenceCpu[i].toFixed(2)})`)
      } finally {
        await Promise.all([first.stop(), second.stop()])
      }
    }
  }
  return out
}
