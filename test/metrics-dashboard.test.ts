import t from 'tap'
import { readFileSync } from 'node:fs'
import { Registry } from 'prom-client'
import { build } from './helpers/server.js'
import { parseExposition } from './helpers/exposition.js'

interface Dashboard {
  panels: Array<{ title: string, targets: Array<{ expr: string }> }>
  templating: { list: Array<{ definition?: string, query?: { query?: string } }> }
}

const GROUPING = /\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)/g
const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'Inf', 'NaN'])

/** What a PromQL expression reads: metric names, label names, and the values its matchers name. */
function readsOf (expr: string): { metrics: string[], labels: string[], matchers: Array<[string, string, string]> } {
  const labels: string[] = []
  const matchers: Array<[string, string, string]> = []
  let rest = expr.replace(GROUPING, (_all, list: string) => {
    labels.push(...list.split(',').map((label) => label.trim()).filter((label) => label !== ''))
    return ' '
  })
  rest = rest.replace(/\{([^}]*)\}/g, (_all, inner: string) => {
    for (const m of inner.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"/g)) {
      labels.push(m[1])
      matchers.push([m[1], m[2], m[3]])
    }
    return ' '
  })
  rest = rest.replace(/\[[^\]]*\]/g, ' ').replace(/"(?:[^"\\]|\\.)*"/g, ' ')
  const metrics: string[] = []
  for (const m of rest.matchAll(/(\$?)([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    if (m[1] === '$' || m[3] !== undefined || KEYWORDS.has(m[2])) continue
    metrics.push(m[2])
  }
  return { metrics, labels, matchers }
}

t.test('the PromQL reader finds what an expression reads', async (t) => {
  t.same(readsOf('histogram_quantile(0.99, sum by (pool, le) (rate(x_bucket{pool=~"$pool"}[$__rate_interval])))'),
    { metrics: ['x_bucket'], labels: ['pool', 'le', 'pool'], matchers: [['pool', '=~', '$pool']] })
  t.same(readsOf('sum(a) / sum without (instance) (b_total{result!="admitted"}) > bool 0').metrics, ['a', 'b_total'])
  t.same(readsOf('label_values(some_gauge, pool)').metrics, ['some_gauge', 'pool'], 'a function\'s label argument reads as a name')
})

t.test('the dashboard reads only metrics, labels and results the plugin registers, and every one of them', async (t) => {
  const dashboard = JSON.parse(readFileSync(new URL('../examples/grafana-dashboard.json', import.meta.url), 'utf8')) as Dashboard
  const registry = new Registry()
  const app = await build(t, { maxConnections: 100, metrics: { registry } })
  await app.ready()
  const exposition = parseExposition(await registry.metrics())
  const families = [...exposition.types]
  const series = new Set<string>()
  for (const [name, type] of families) {
    for (const suffix of type === 'histogram' ? ['_bucket', '_sum', '_count'] : ['']) series.add(name + suffix)
  }
  const labels = new Set(exposition.samples.flatMap((s) => Object.keys(s.labels)))
  const results = new Set(exposition.samples.map((s) => s.labels.result).filter((r) => r !== undefined))
  t.same([...labels].sort(), ['le', 'pool', 'priority', 'result'])
  t.same([...results].sort(), ['abandoned', 'admitted', 'closing', 'overloaded', 'queue_full', 'queue_timeout', 'rejected', 'store_unavailable'])

  const exprs = dashboard.panels.flatMap((panel) => panel.targets.map((target) => target.expr))
  t.ok(exprs.length >= 8, `${exprs.length} queries`)
  const used = new Set<string>()
  for (const expr of exprs) {
    const reads = readsOf(expr)
    t.ok(reads.metrics.length > 0, `reads a metric: ${expr}`)
    for (const metric of reads.metrics) {
      t.ok(series.has(metric), `${metric} is registered`)
      used.add(metric)
    }
    for (const label of reads.labels) t.ok(labels.has(label), `label ${label} is exposed`)
    for (const [label, op, value] of reads.matchers) {
      if (label !== 'result') continue
      const values = op === '=~' || op === '!~' ? value.split('|') : [value]
      for (const v of values) t.ok(results.has(v), `result "${v}" is counted`)
    }
  }
  // The pool variable.
  for (const variable of dashboard.templating.list) {
    const query = variable.query?.query ?? variable.definition ?? ''
    const m = /^label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*), ([a-z_]+)\)$/.exec(query)
    t.ok(m !== null && series.has(m[1]) && labels.has(m[2]), `variable query ${query}`)
  }
  for (const [name, type] of families) {
    const shown = type === 'histogram' ? used.has(`${name}_bucket`) : used.has(name)
    t.ok(shown, `the dashboard shows ${name}`)
  }
})
