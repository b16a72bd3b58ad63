import { measureCost, type CostVariant } from '../cost.js'
import { duration, machine, num, round, settingsBase as base } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import type { ServerSettings } from '../server.js'
import { median } from '../stats.js'

export async function rejectCost (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const connections = 50
  // Without the retry-storm brake: this measures what one refusal costs.
  const plugin: ServerSettings = { ...base, variant: 'plugin', plugin: { rejectDelay: 0 } }
  const variants: CostVariant[] = [
    { name: 'Fastify 200 (hello)', settings: { ...base, variant: 'bare' }, path: '/hello' },
    { name: 'node:http 503', settings: { ...base, variant: 'raw' }, path: '/' },
    { name: 'Fastify 503 from onRequest', settings: { ...base, variant: 'bare' }, path: '/early-503' },
    { name: 'plugin 503 (rejectDelay 0)', settings: plugin, path: '/rejected', saturate: true }
  ]
  const figures = await measureCost(variants, repeats, connections)
  const bare = median(figures.get(variants[0].name)?.cpu ?? [])
  const table: Table = {
    title: `Cost of a response (${connections} connections, ${duration} s x ${repeats}, medians; server CPU per response)`,
    columns: ['response', 'responses/s', 'CPU µs/response', 'x a Fastify 200'],
    rows: variants.map((v) => {
      const f = figures.get(v.name) as { rps: number[], cpu: number[] }
      return [v.name, round(median(f.rps), 0), round(median(f.cpu), 2), (median(f.cpu) / bare).toFixed(2)]
    })
  }
  return { scenario: 'reject-cost', title: 'Cost of a rejection', options: { connections, duration, repeats }, machine, tables: [table], charts: [], data: Object.fromEntries(figures) }
}
