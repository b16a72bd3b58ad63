// Server CPU per response of server variants, measured interleaved.
import { closedLoop } from './closedloop.js'
import { duration, progress, withTarget } from './lab.js'
import type { ServerSettings } from './server.js'

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
