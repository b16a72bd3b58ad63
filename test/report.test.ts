// The lab report's rules, over result objects: no load is generated here.
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { GENERATOR_LAG_LIMIT_MS, markNoAnswers, orderResults, present, rejectCostRows, saturation } from '../load-tests/present.js'
import { mainRun, markdownTable, niceCeil, printTable, renderReport, runOf, stepSummary, svgChart, writeHtmlReport, type Chart, type ScenarioResult, type Table } from '../load-tests/report.js'
import { formatNumber, formatSpread, median, percentile, spread, summarize } from '../load-tests/stats.js'

const RUN = '2026-11-26T12:03:07.662Z'
const OLD = '2026-11-20T09:00:00.000Z'

function result (scenario: string, data: unknown, tables: Table[] = [], extra: Partial<ScenarioResult> = {}): ScenarioResult {
  return { scenario, title: `${scenario} title`, run: RUN, options: {}, machine: { cores: 2, node: 'v20.20.2', platform: 'linux', date: RUN }, tables, charts: [], data, ...extra }
}

const goodputRow = (variant: string, multiple: number, over: Record<string, number> = {}) => ({ variant, multiple, targetPerS: 200 * multiple, offeredPerS: 200 * multiple, goodputPerS: 190, p99: 100, generatorLagP99: 5, ...over })
function goodputResult (rows: Array<Record<string, number | string>>): ScenarioResult {
  const table: Table = { title: 'goodput', columns: ['load', 'variant', 'goodput/s', 'p99 2xx ms'], rows: rows.map((r) => [`${r.multiple}x`, r.variant, r.goodputPerS, r.p99]) }
  const step: Chart = { title: 'step', x: 's', y: '2xx/s', series: [{ name: 'bare', points: [[0, 1], [1, 2]] }] }
  return result('goodput', { rows }, [table, { title: 'step', columns: ['variant', 'recovery'], rows: [['bare', '1 s']] }], { charts: [step, step, step] })
}

t.test('stats: medians, percentiles, spreads', async (t) => {
  t.equal(percentile([], 99), 0)
  t.equal(percentile([1, 2, 3, 4], 50), 2)
  t.same(summarize([]), { p50: 0, p99: 0, max: 0 })
  t.same(summarize([3, 1, 2]), { p50: 2, p99: 3, max: 3 })
  t.equal(median([3, 1, 2]), 2)
  t.equal(median([4, 1, 2, 3]), 2.5)
  t.equal(spread([]), null)
  t.equal(spread([Number.NaN]), null, 'no finite value is no answer')
  t.same(spread([5, 1, 3]), { median: 3, min: 1, max: 5, n: 3 })
  t.equal(formatNumber(4772.25, 0), '4,772')
  t.equal(formatSpread(null), 'no answers')
  t.equal(formatSpread(spread([11.7]), 2), '11.70', 'one run: its value, no range')
  t.equal(formatSpread(spread([4772, 4512, 4901]), 0), '4,772 (4,512–4,901, n=3)')
})

t.test('sections come in story order, unknown scenarios after pooled-client', async (t) => {
  const names = ['backlog', 'bench', 'memory', 'zeta', 'reject-cost', 'retry-storm', 'alpha', 'pooled-client', 'deadlock', 'threads', 'goodput', 'explosion']
  t.same(orderResults(names.map((scenario) => ({ scenario }))).map((r) => r.scenario),
    ['explosion', 'goodput', 'threads', 'deadlock', 'retry-storm', 'pooled-client', 'alpha', 'zeta', 'reject-cost', 'bench', 'memory', 'backlog'])
  const report = renderReport(['memory', 'zeta', 'explosion'].map((s) => result(s, [], [], { title: s })))
  t.ok(report.summary.indexOf('## explosion') < report.summary.indexOf('## zeta'))
  t.ok(report.summary.indexOf('## zeta') < report.summary.indexOf('## memory'))
})

t.test('saturation: generator lag or offered load short of the target', async (t) => {
  t.equal(saturation({ generatorLagP99: GENERATOR_LAG_LIMIT_MS }), null)
  t.equal(saturation({ targetPerS: 100, offeredPerS: 95, generatorLagP99: 5 }), null)
  t.equal(saturation({ targetPerS: 0, offeredPerS: 0 }), null)
  t.equal(saturation({ generatorLagP99: 172 }), 'generator saturated (lag p99 172 ms)')
  t.equal(saturation({ targetPerS: 10000, offeredPerS: 7000, generatorLagP99: 851 }), 'generator saturated (lag p99 851 ms, offered 70% of target)')
})

t.test('goodput: saturated points flagged in the table and drawn hollow', async (t) => {
  const view = present(goodputResult([goodputRow('bare', 1), goodputRow('plugin', 50, { generatorLagP99: 172 }), goodputRow('bare', 50, { goodputPerS: 0, p99: 0, offeredPerS: 5000 })]))
  const [table] = view.tables
  t.equal(table.columns.at(-1), 'generator')
  t.same(table.rows.map((r) => r.at(-1)), ['kept up', 'generator saturated (lag p99 172 ms)', 'generator saturated (offered 50% of target)'])
  t.same(table.rows[2].slice(2, 4), [0, 'no answers'], 'goodput 0 stays 0; its latency is no answers')
  t.equal(view.charts.length, 3)
  const svg = svgChart(view.charts[0])
  t.match(svg, /fill="#fff" stroke="[^"]+" stroke-width="1.5"><title>generator saturated \(lag p99 172 ms\)/)
  t.match(svg, /○ generator saturated</)
  t.match(svgChart(view.charts[1]), /×<\/text>/, 'no answers drawn as a cross, not a 0')
  t.match(view.notes[0], /50x plugin, 50x bare/)
  t.same(present(goodputResult([goodputRow('bare', 1)])).notes, [])
})

t.test('no answers: a row where nothing succeeded reads as such, not as zeros', async (t) => {
  const table: Table = {
    title: 'threads',
    columns: ['connections', 'variant', '2xx/s', '503/s', 'p50 2xx ms', 'p99 2xx ms', 'p99 all answers ms (client)', 'ELD p99 ms'],
    rows: [[500, 'thread per request', 0, 0, 0, 0, 0, 0], [500, 'pool + plugin', 352, 677, 53.4, 86.9, 1011, 17]]
  }
  const marked = markNoAnswers(table)
  t.same(marked.rows[0], [500, 'thread per request', 0, 0, 'no answers', 'no answers', 'no answers', 0])
  t.same(marked.rows[1], table.rows[1])
  t.equal(markNoAnswers({ title: 'x', columns: ['a'], rows: [[0]] }).rows[0][0], 0, 'no 2xx column: unchanged')
  const rows = [{ variant: 'thread per request', connections: 500, okPerS: 0, p99: 0 }, { variant: 'pool + plugin', connections: 500, okPerS: 352, p99: 86.9 }, { variant: 'pool + plugin', connections: 10, okPerS: 374, p99: 32 }]
  const view = present(result('threads', rows, [table]))
  t.equal(view.tables[0].rows[0][5], 'no answers')
  t.equal(view.charts.length, 2)
  t.same(view.charts[1].series[0].points, [[500, null]])
  t.match(svgChart(view.charts[1]), /× no answers/)
  t.equal(view.notes.length, 1)
  t.same(present(result('threads', rows.slice(1), [table])).notes, [])
})

t.test('deadlock: bars, and no recovery shown as such', async (t) => {
  const rows = [{ case: 'shared pool, queueTimeout 30 s', okPerS: 0, failedPerS: 0, timeouts: 50, p99: 0, recoveredMs: -1 }, { case: 'separate pools', okPerS: 452.9, failedPerS: 0, timeouts: 0, p99: 121, recoveredMs: 24 }]
  const table: Table = { title: 'deadlock', columns: ['case', '2xx/s', 'failed/s', 'client timeouts', 'p99 ms', 'first success after load, ms'], rows: rows.map((r) => [r.case, r.okPerS, r.failedPerS, r.timeouts, r.p99, r.recoveredMs]) }
  const view = present(result('deadlock', rows, [table]))
  t.same(view.tables[0].rows[0], ['shared pool, queueTimeout 30 s', 0, 0, 50, 'no answers', 'none within 35 s'])
  t.equal(view.charts.length, 2)
  t.ok(view.charts.every((c) => c.kind === 'bars'))
  const bars = svgChart(view.charts[1])
  t.match(bars, /no answers/)
  t.match(bars, /separate pools/)
  t.match(svgChart(view.charts[0]), /failed\/s/, 'a legend when there are several series')
})

t.test('reject-cost: spread beside medians; below the node:http floor is noise', async (t) => {
  const figures = {
    'Fastify 200 (hello)': { rps: [82000, 84000, 81000], cpu: [11.7, 11.4, 12] },
    'node:http 503': { rps: [88000, 88000, 85000], cpu: [10.7, 10.8, 10.9] },
    'plugin 503 (rejectDelay 0)': { rps: [90000, 91000, 95000], cpu: [7.1, 7.3, 7.2] }
  }
  const { rows, noise } = rejectCostRows(figures)
  t.same(noise, ['plugin 503 (rejectDelay 0)'])
  t.same(rows[0], ['Fastify 200 (hello)', '82,000 (81,000–84,000, n=3)', '11.70 (11.40–12.00, n=3)', '1.00', ''])
  t.equal(rows[1][4], '', 'the floor itself is no noise')
  t.same(rows[2].slice(3), ['0.62 (noise)', 'below the node:http floor: noise, not a finding'])
  const view = present(result('reject-cost', figures, [{ title: 'Cost (medians; CPU)', columns: [], rows: [] }]))
  t.match(view.tables[0].title, /median \(min-max, n runs\)/)
  t.match(view.notes[0], /plugin 503 \(rejectDelay 0\) measured below node:http/)
  t.equal(view.charts[0].reference?.label, 'node:http 503')
  t.match(svgChart(view.charts[0]), /floor: node:http 503/)
  t.equal(view.notes.length, 1, 'the reference is above the floor')
  const upsideDown = { ...figures, 'node:http 503': { rps: [1], cpu: [13] } }
  t.same(rejectCostRows(upsideDown).rows[0][4], '', 'the reference row is never flagged')
  t.match(present(result('reject-cost', upsideDown, [{ title: 't', columns: [], rows: [] }])).notes.at(-1), /Even Fastify 200 \(hello\) measured below the node:http floor/)
  const noFloor = present(result('reject-cost', { a: figures['Fastify 200 (hello)'], b: figures['plugin 503 (rejectDelay 0)'] }, [{ title: 'x', columns: [], rows: [] }]))
  t.same(noFloor.notes, [])
  t.equal(noFloor.charts[0].reference, undefined)
})

t.test('bench: spreads of rates, costs and per-round ratios', async (t) => {
  const figures = { bare: { rps: [100, 110], cpu: [10, 9] }, plugin: { rps: [95, 100], cpu: [11, 10] } }
  const view = present(result('bench', figures, [{ title: 'medians of per-round ratios', columns: [], rows: [] }]))
  t.same(view.tables[0].rows[0], ['bare', '105 (100–110, n=2)', '9.50 (9.00–10.00, n=2)', '1 (reference)', '1 (reference)'])
  t.same(view.tables[0].rows[1].slice(3), ['0.930 (0.909–0.950, n=2)', '1.106 (1.100–1.111, n=2)'])
  t.equal(view.charts.length, 1)
  t.match(svgChart(view.charts[0]), /<line [^>]*stroke="#000"\/>/, 'whiskers over the range')
  const empty = present(result('bench', { ...figures, broken: { rps: [], cpu: [] } }, [{ title: 't', columns: [], rows: [] }]))
  t.same(empty.tables[0].rows[2], ['broken', 'no answers', 'no answers', 'no answers', 'no answers'])
  t.same(empty.charts[0].series[0].points[2], [2, null])
  t.match(svgChart(empty.charts[0]), /no answers/)
})

t.test('bench, paired: each ratio against the reference measured beside it', async (t) => {
  const figures = {
    'bare (A/A)': { rps: [100, 90], cpu: [10, 11], referenceRps: [100, 100], referenceCpu: [10, 10] },
    plugin: { rps: [95, 80], cpu: [11, 12], referenceRps: [100, 100], referenceCpu: [10, 10] }
  }
  const view = present(result('bench', figures, [{ title: 'medians of per-pair ratios', columns: [], rows: [] }]))
  t.match(view.tables[0].title, /median \(min-max, n runs\) of per-pair ratios/)
  t.same(view.tables[0].rows[0].slice(3), ['0.950 (0.900–1.000, n=2)', '1.050 (1.000–1.100, n=2)'], 'the A/A row shows its noise, not 1')
  t.same(view.tables[0].rows[1].slice(3), ['0.875 (0.800–0.950, n=2)', '1.150 (1.100–1.200, n=2)'])
  t.match(view.notes[0], /A\/A/)
})

t.test('memory and backlog get charts; a missing counter is no data, not 0', async (t) => {
  const memory = present(result('memory', [{ connections: 1000, state: 'idle', liveKiBPerConnection: 3.4 }, { connections: 4000, state: 'idle', liveKiBPerConnection: 3 }], [{ title: 'm', columns: [], rows: [] }]))
  t.equal(memory.charts.length, 1)
  t.same(memory.charts[0].series[0].points, [[1000, 3.4], [4000, 3]])
  const backlog = present(result('backlog', [[511, 6216, 1696, 11634, 951, 5115], [4096, 'n/a', 'n/a', 13675, 570, 5105]], [{ title: 'b', columns: [], rows: [] }]))
  t.same(backlog.charts[0].series[0].points, [[0, 6216], [1, null]])
  t.equal(backlog.notes.length, 1)
  t.same(present(result('backlog', [[511, 1, 2, 3, 4, 5]], [])).notes, [])
})

t.test('retry storm and pooled client: spread from the runs, charts with whiskers', async (t) => {
  const run = (okPerS: number) => ({ okPerS, goodputPct: okPerS / 50, timeouts: 1, generatorLagP99: 5 })
  const runs = { '1000|bare': [run(18000), run(18300)], '1000|plugin': [run(4700), run(4772), run(4800)], '5000|plugin': [] }
  const table: Table = { title: 'storm', columns: ['connections', 'variant', '2xx/s', 'p99'], rows: [[1000, 'bare', 18150, 1], [1000, 'plugin', '4,772 (already)', 2], [5000, 'other', 1, 3]] }
  const storm = present(result('retry-storm', runs, [table]))
  t.same(storm.tables[0].rows.map((r) => r[2]), ['18,150 (18,000–18,300, n=2)', '4,772 (already)', 1])
  t.same(storm.charts[0].series.map((s) => s.name), ['bare', 'plugin'])
  t.same(storm.charts[0].series[1].points, [[1000, 4772], [5000, null]])
  t.same(storm.charts[0].series[1].ranges, [[4700, 4800], null])
  const stormSvg = svgChart(storm.charts[0])
  t.equal((stormSvg.match(/<line x1="([\d.]+)" y1="[\d.]+" x2="\1"/g) ?? []).length, 3, 'a whisker for every point with runs')
  t.match(stormSvg, /× no answers/)
  t.same(present(result('retry-storm', runs, [{ ...table, columns: ['a'] }])).tables[0].rows, table.rows, 'no 2xx/s column: unchanged')
  const pooledRuns = { '10|defaults': [run(200), { ...run(150), generatorLagP99: 120 }, { ...run(150), generatorLagP99: 130 }] }
  const pooled = present(result('pooled-client', pooledRuns, [{ title: 'p', columns: ['load', 'variant'], rows: [['10x', 'defaults'], ['25x', 'defaults']] }]))
  t.same(pooled.tables[0].rows.map((r) => r.at(-1)), ['generator saturated (lag p99 120 ms)', 'kept up'])
  t.equal(pooled.charts.length, 2)
  t.same(pooled.charts[0].series[0].notes, ['generator saturated (lag p99 120 ms)'])
})

t.test('scenarios without a view keep their tables and charts', async (t) => {
  const chart: Chart = { title: 'c', x: 'x', y: 'y', series: [] }
  const view = present(result('explosion', [], [{ title: 'e', columns: ['2xx/s', 'p99 2xx ms'], rows: [[0, 0]] }], { charts: [chart] }))
  t.same(view.tables[0].rows, [[0, 'no answers']])
  t.same(view.charts, [chart])
})

t.test('only this run: other runs in the folder are marked with their date', async (t) => {
  t.equal(mainRun([]), undefined)
  const legacy = result('bench', { a: { rps: [1], cpu: [1] } }, [{ title: 't', columns: [], rows: [] }], { run: undefined, machine: { cores: 2, node: 'v20', platform: 'linux', date: OLD } })
  t.equal(runOf(legacy), OLD, 'results saved before runs were stamped: their date is their run')
  const current = [result('explosion', []), result('memory', [])]
  t.equal(mainRun([...current, legacy]), RUN, 'the run most sections come from')
  t.equal(mainRun([result('explosion', []), legacy]), RUN, 'a tie goes to the newest')
  const fresh = renderReport(current, RUN)
  t.notMatch(fresh.summary, /Not from this run/)
  t.notMatch(fresh.summary, /bench/)
  const merged = renderReport([...current, legacy], RUN)
  t.match(merged.summary, /## bench title\n\n\*\*Not from this run: measured 2026-11-20 09:00:00 UTC\.\*\*/)
  t.match(merged.html, /<p class="other">Not from this run: measured 2026-11-20 09:00:00 UTC\.<\/p>/)
  t.match(merged.html, /bench title<\/a> \(measured 2026-11-20 09:00:00 UTC\)/)
  t.equal((merged.summary.match(/Not from this run/g) ?? []).length, 1)
  t.match(renderReport([]).summary, /no results/)
})

t.test('charts: axes, gaps and markers', async (t) => {
  t.same([0, -1, 1, 1.5, 2.2, 4, 7].map(niceCeil), [1, 1, 1, 2, 2.5, 5, 10])
  const many: Chart = { title: 'a <b>', x: 'x', y: 'y', logX: true, series: [{ name: 's', points: Array.from({ length: 14 }, (_, i) => [i + 1, i / 3] as [number, number]) }] }
  const svg = svgChart(many)
  t.match(svg, /a &lt;b>/, 'text is escaped')
  t.equal((svg.match(/<polyline/g) ?? []).length, 1)
  const gap: Chart = { title: 'gap', x: 'x', y: 'y', series: [{ name: 's', points: [[1, 1], [2, 2], [3, null], [4, 4], [5, 5]], missing: 'nothing' }] }
  const gapped = svgChart(gap)
  t.equal((gapped.match(/<polyline/g) ?? []).length, 2, 'the line breaks where there is no answer')
  t.match(gapped, /× nothing/)
  t.match(svgChart({ title: 'empty', x: 'x', y: 'y', series: [{ name: 'none', points: [[1, null]] }] }), /<svg/)
  t.match(svgChart({ kind: 'bars', title: 'no categories', x: 'x', y: 'y', series: [] }), /<svg/)
})

t.test('tables: terminal, markdown, step summary', async (t) => {
  const table: Table = { title: 'T', columns: ['a', 'b'], rows: [[1, 2.25], ['x', 'no answers']] }
  t.equal(markdownTable(table), '### T\n\n| a | b |\n|---|---|\n| 1 | 2.3 |\n| x | no answers |\n')
  const lines: string[] = []
  const log = t.capture(console, 'log')
  printTable(table)
  lines.push(...log().map((c) => c.args.join(' ')))
  t.same(lines.slice(1), ['a           b', '-  ----------', '1         2.3', 'x  no answers'])
  const dir = t.testdir({})
  const file = join(dir, 'summary')
  const saved = process.env.GITHUB_STEP_SUMMARY
  t.teardown(() => {
    if (saved === undefined) delete process.env.GITHUB_STEP_SUMMARY
    else process.env.GITHUB_STEP_SUMMARY = saved
  })
  process.env.GITHUB_STEP_SUMMARY = ''
  stepSummary([table])
  process.env.GITHUB_STEP_SUMMARY = file
  stepSummary([table])
  t.equal(readFileSync(file, 'utf8'), markdownTable(table) + '\n')
  delete process.env.GITHUB_STEP_SUMMARY
  stepSummary([table])
})

t.test('writeHtmlReport renders a folder: its JSON, in order, charts beside it', async (t) => {
  const dir = t.testdir({ 'notes.json': '{"hello": 1}' })
  writeFileSync(join(dir, 'memory.json'), JSON.stringify(result('memory', [{ connections: 1, state: 'idle', liveKiBPerConnection: 1 }], [{ title: 'm', columns: [], rows: [] }])))
  writeFileSync(join(dir, 'bench.json'), JSON.stringify(result('bench', { a: { rps: [1], cpu: [1] } }, [{ title: 'b', columns: [], rows: [] }], { run: OLD })))
  const file = writeHtmlReport(dir)
  t.equal(file, join(dir, 'report.html'))
  const summary = readFileSync(join(dir, 'summary.md'), 'utf8')
  t.ok(summary.indexOf('## bench') < summary.indexOf('## memory'))
  t.match(summary, /Not from this run/, 'a tie goes to the newest run; the other is marked')
  t.match(readFileSync(join(dir, 'memory-1.svg'), 'utf8'), /^<svg/)
  t.match(readFileSync(join(dir, 'bench-1.svg'), 'utf8'), /^<svg/)
  writeHtmlReport(dir, OLD)
  t.match(readFileSync(join(dir, 'summary.md'), 'utf8'), /## memory title\n\n\*\*Not from this run/)
})
