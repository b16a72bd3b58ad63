import { measurePaired, type CostVariant } from '../cost.js'
import { duration, machine, num, round, settingsBase as base } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import { median } from '../stats.js'

export async function bench (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const connections = 50
  const bare: CostVariant = { name: 'bare Fastify', settings: { ...base, variant: 'bare' }, path: '/hello' }
  const variants: CostVariant[] = [
    // Bare against bare: what the pairing cannot tell from noise.
    { ...bare, name: 'bare Fastify (A/A: the noise floor)' },
    { name: 'with the plugin', settings: { ...base, variant: 'plugin', maxConcurrency: 10_000, maxQueue: 0 }, path: '/hello' },
    { name: 'with the plugin and metrics', settings: { ...base, variant: 'plugin', maxConcurrency: 10_000, maxQueue: 0, metrics: true }, path: '/hello' },
    // Below saturation: a limit far above the connections, that latency
    // samples move. The lab's one-slot pool keeps a fixed limit.
    {
      name: 'with the plugin, adaptive',
      settings: {
        ...base,
        variant: 'plugin',
        maxConcurrency: 10_000,
        maxQueue: 0,
        plugin: {
          adaptive: { initialConcurrency: 1000 },
          groups: { saturated: { maxConcurrency: 1, maxQueue: 0, adaptive: false } }
        }
      },
      path: '/hello'
    },
    // The yardstick: what two empty hooks cost, measured the same way.
    { name: 'two empty hooks, no plugin', settings: { ...base, variant: 'bare', emptyHooks: true }, path: '/hello-hooks' },
    // What the plugin cannot go below while it decides in onRequest.
    { name: 'one empty route-level onRequest hook, no plugin', settings: { ...base, variant: 'bare', emptyHooks: true }, path: '/hello-hook' }
  ]
  const figures = await measurePaired(bare, variants, repeats, connections)
  const table: Table = {
    title: `Overhead on hello-world, each variant beside bare Fastify (${connections} connections each, ${duration} s x ${repeats}, medians of per-pair ratios)`,
    columns: ['variant', 'req/s', 'server CPU µs/req', 'req/s ratio', 'CPU/req ratio'],
    rows: variants.map((v) => {
      const f = figures.get(v.name) as { rps: number[], cpu: number[], referenceRps: number[], referenceCpu: number[] }
      const rpsRatio = median(f.rps.map((x, i) => x / f.referenceRps[i]))
      const cpuRatio = median(f.cpu.map((x, i) => x / f.referenceCpu[i]))
      return [v.name, round(median(f.rps), 0), round(median(f.cpu), 2), rpsRatio.toFixed(3), cpuRatio.toFixed(3)]
    })
  }
  return { scenario: 'bench', title: 'Overhead benchmark', options: { connections, duration, repeats, paired: true }, machine, tables: [table], charts: [], data: Object.fromEntries(figures) }
}
