// How a scenario's result reads in the report: the order of the sections,
// min-max spreads beside medians, and flags for figures that are not
// findings (a saturated generator, no answers, noise under a floor). Pure
// functions over the saved JSON, so a report can be rendered again from
// results measured before these rules existed.
import type { Chart, ScenarioResult, Series, Table } from './report.js'
import { formatNumber, formatSpread, median, spread } from './stats.js'

/** The story: what breaks, what the plugin saves, the costs, then the kernel. */
export const ORDER = ['explosion', 'goodput', 'threads', 'deadlock', 'retry-storm', 'pooled-client', 'cpu', 'priority', 'adaptive', 'reject-cost', 'bench', 'instructions', 'memory', 'backlog']

/** Above this event-loop lag (p99, ms) the open-loop generator no longer sends on schedule. */
export const GENERATOR_LAG_LIMIT_MS = 50
/** Below this share of the target rate, the generator did not offer the load asked of it. */
export const OFFERED_MIN_RATIO = 0.9

export const NO_ANSWERS = 'no answers'

/** Sections in story order; scenarios the order does not know come after pooled-client, by name. */
export function orderResults<T extends { scenario: string }> (results: T[]): T[] {
  const known = ORDER.indexOf('pooled-client') + 0.5
  const rank = (s: string) => (ORDER.includes(s) ? ORDER.indexOf(s) : known)
  return [...results].sort((a, b) => rank(a.scenario) - rank(b.scenario) || a.scenario.localeCompare(b.scenario))
}

export interface GeneratorFigures {
  targetPerS?: number
  offeredPerS?: number
  generatorLagP99?: number
}

/** Why a point's load was not what was asked, or null when the generator kept up. */
export function saturation (f: GeneratorFigures): string | null {
  const reasons: string[] = []
  if (f.generatorLagP99 !== undefined && f.generatorLagP99 > GENERATOR_LAG_LIMIT_MS) reasons.push(`lag p99 ${formatNumber(f.generatorLagP99, 0)} ms`)
  if (f.targetPerS !== undefined && f.offeredPerS !== undefined && f.targetPerS > 0 && f.offeredPerS < OFFERED_MIN_RATIO * f.targetPerS) {
    reasons.push(`offered ${formatNumber(100 * f.offeredPerS / f.targetPerS, 0)}% of target`)
  }
  return reasons.length === 0 ? null : `generator saturated (${reasons.join(', ')})`
}

const isLatencyOfAnswers = (column: string) => / ms/.test(column) && /p50|p99|max/.test(column) && !/generator|ELD|503/.test(column)

/**
 * Rows where nothing succeeded (2xx/s or goodput/s is 0) have no latency to show: their
 * latency cells read "no answers", not 0.
 */
export function markNoAnswers (table: Table): Table {
  const ok = table.columns.findIndex((c) => c === '2xx/s' || c === 'goodput/s')
  if (ok === -1) return table
  const latency = table.columns.map((c, i) => (isLatencyOfAnswers(c) ? i : -1)).filter((i) => i !== -1)
  return {
    ...table,
    rows: table.rows.map((row) => (row[ok] === 0 ? row.map((v, i) => (latency.includes(i) && v === 0 ? NO_ANSWERS : v)) : row))
  }
}

export interface Presented {
  tables: Table[]
  charts: Chart[]
  notes: string[]
}

type Row = Record<string, number | string>
type Runs = Record<string, Array<Record<string, number>>>

const line = (title: string, x: string, y: string, series: Series[], logX = false): Chart => ({ title, x, y, logX, series })

/** Lines over a numeric x, one per name, from rows. A 0 where nothing answered is a gap. */
function lines (rows: Row[], name: string, x: string, y: string, opts: { noAnswers?: (r: Row) => boolean, note?: (r: Row) => string | null } = {}): Series[] {
  const names = [...new Set(rows.map((r) => String(r[name])))]
  return names.map((n) => {
    const mine = rows.filter((r) => String(r[name]) === n)
    return {
      name: n,
      points: mine.map((r) => [Number(r[x]), opts.noAnswers?.(r) === true ? null : Number(r[y])] as [number, number | null]),
      notes: mine.map((r) => opts.note?.(r) ?? null)
    }
  })
}

/** Repeated runs keyed "x|variant": one line per variant through the medians, whiskers over the range. */
function spreadLines (runs: Runs, field: string, note?: (values: Array<Record<string, number>>) => string | null): Series[] {
  const keys = Object.keys(runs)
  const variants = [...new Set(keys.map((k) => k.slice(k.indexOf('|') + 1)))]
  return variants.map((v) => {
    const mine = keys.filter((k) => k.slice(k.indexOf('|') + 1) === v)
    const stats = mine.map((k) => spread(runs[k].map((r) => r[field])))
    return {
      name: v,
      points: mine.map((k, i) => [Number(k.slice(0, k.indexOf('|'))), stats[i]?.median ?? null] as [number, number | null]),
      ranges: stats.map((s) => (s === null ? null : [s.min, s.max] as [number, number])),
      notes: mine.map((k) => note?.(runs[k]) ?? null)
    }
  })
}

/** Replaces a numeric median in `column` by the spread of `field` over the runs of that row. */
function withSpread (table: Table, runs: Runs, column: string, field: string, keyOf: (row: Array<string | number>) => string, digits = 0): Table {
  const at = table.columns.indexOf(column)
  if (at === -1) return table
  return {
    ...table,
    rows: table.rows.map((row) => {
      const values = runs[keyOf(row)]?.map((r) => r[field])
      return typeof row[at] === 'number' && values !== undefined ? row.map((v, i) => (i === at ? formatSpread(spread(values), digits) : v)) : row
    })
  }
}

function goodput (r: ScenarioResult): Presented {
  const data = r.data as { rows: Row[] }
  const flag = (row: Row) => saturation({ targetPerS: Number(row.targetPerS), offeredPerS: Number(row.offeredPerS), generatorLagP99: Number(row.generatorLagP99) })
  const [main, ...rest] = r.tables
  const table = markNoAnswers({ ...main, columns: [...main.columns, 'generator'], rows: main.rows.map((row, i) => [...row, flag(data.rows[i]) ?? 'kept up']) })
  const none = (row: Row) => row.goodputPerS === 0 && row.p99 === 0
  const charts = [
    line('Goodput vs offered load', 'offered load (x capacity)', '2xx within timeout / s', lines(data.rows, 'variant', 'multiple', 'goodputPerS', { note: flag }), true),
    line('p99 latency of 2xx vs offered load', 'offered load (x capacity)', 'ms', lines(data.rows, 'variant', 'multiple', 'p99', { note: flag, noAnswers: none }), true),
    ...r.charts.slice(2)
  ]
  const saturated = data.rows.filter((row) => flag(row) !== null).map((row) => `${String(row.multiple)}x ${String(row.variant)}`)
  const notes = saturated.length === 0 ? [] : [`The generator could not keep up at ${saturated.join(', ')}: those points understate what the server would see and are drawn hollow.`]
  return { tables: [table, ...rest], charts, notes }
}

function threads (r: ScenarioResult): Presented {
  const rows = r.data as Row[]
  const none = (row: Row) => row.okPerS === 0
  return {
    tables: r.tables.map(markNoAnswers),
    charts: [
      ...r.charts,
      line('2xx per second vs connections (threads)', 'connections', 'req/s', lines(rows, 'variant', 'connections', 'okPerS'), true),
      line('p99 latency of 2xx vs connections (threads)', 'connections', 'ms', lines(rows, 'variant', 'connections', 'p99', { noAnswers: none }), true)
    ],
    notes: rows.some(none) ? ['A row where nothing answered shows "no answers" and a gap in the latency chart, not 0 ms.'] : []
  }
}

function deadlock (r: ScenarioResult): Presented {
  const rows = r.data as Row[]
  const recovered = r.tables[0].columns.indexOf('first success after load, ms')
  const table = markNoAnswers(r.tables[0])
  table.rows = table.rows.map((row) => row.map((v, i) => (i === recovered && v === -1 ? 'none within 35 s' : v)))
  const categories = rows.map((row) => String(row.case))
  return {
    tables: [table],
    charts: [
      { kind: 'bars', title: 'Self-calls: answers per second by case', x: 'case', y: 'per second', categories, series: [{ name: '2xx/s', points: rows.map((row, i) => [i, Number(row.okPerS)]) }, { name: 'failed/s', points: rows.map((row, i) => [i, Number(row.failedPerS)]) }] },
      { kind: 'bars', title: 'First success after the load stops', x: 'case', y: 'ms', categories, series: [{ name: 'ms', points: rows.map((row, i) => [i, Number(row.recoveredMs) < 0 ? null : Number(row.recoveredMs)]) }] }
    ],
    notes: []
  }
}

type Costs = Record<string, { rps: number[], cpu: number[] }>

function costBars (title: string, figures: Costs, floor?: { name: string, value: number }): Chart {
  const names = Object.keys(figures)
  const stats = names.map((n) => spread(figures[n].cpu))
  return {
    kind: 'bars',
    title,
    x: 'response',
    y: 'server CPU µs per response (median, min-max)',
    categories: names,
    series: [{ name: 'CPU µs', points: stats.map((s, i) => [i, s?.median ?? null]), ranges: stats.map((s) => (s === null ? null : [s.min, s.max])) }],
    ...(floor === undefined ? {} : { reference: { value: floor.value, label: floor.name } })
  }
}

/** A refusal that costs less than node:http's own fixed 503 is noise, not a finding. */
export function rejectCostRows (figures: Costs): { rows: Array<Array<string | number>>, noise: string[] } {
  const names = Object.keys(figures)
  const base = median(figures[names[0]].cpu)
  const floorName = names.find((n) => n.startsWith('node:http'))
  const floor = floorName === undefined ? undefined : median(figures[floorName].cpu)
  const noise: string[] = []
  const rows = names.map((n, i) => {
    const cpu = median(figures[n].cpu)
    const below = floor !== undefined && i !== 0 && n !== floorName && cpu < floor
    if (below) noise.push(n)
    const ratio = (cpu / base).toFixed(2)
    return [n, formatSpread(spread(figures[n].rps), 0), formatSpread(spread(figures[n].cpu), 2), below ? `${ratio} (noise)` : ratio, below ? 'below the node:http floor: noise, not a finding' : '']
  })
  return { rows, noise }
}

const base = (figures: Costs) => median(Object.values(figures)[0].cpu)

function rejectCost (r: ScenarioResult): Presented {
  const figures = r.data as Costs
  const { rows, noise } = rejectCostRows(figures)
  const floorName = Object.keys(figures).find((n) => n.startsWith('node:http'))
  const title = r.tables[0].title.replace('medians;', 'median (min-max, n runs);')
  return {
    tables: [{ title, columns: ['response', 'responses/s', 'CPU µs/response', 'x a Fastify 200', 'note'], rows }],
    charts: [costBars('Server CPU per response', figures, floorName === undefined ? undefined : { name: floorName, value: median(figures[floorName].cpu) })],
    notes: [
      ...(noise.length === 0 ? [] : [`${noise.join(', ')} measured below node:http answering a fixed 503, which no Fastify response can be: the difference is the machine's noise.`]),
      ...(floorName !== undefined && base(figures) < median(figures[floorName].cpu) ? [`Even ${Object.keys(figures)[0]} measured below the node:http floor: this run's costs are noise.`] : [])
    ]
  }
}

function bench (r: ScenarioResult): Presented {
  const figures = r.data as Costs & Record<string, { referenceRps?: number[], referenceCpu?: number[] }>
  const names = Object.keys(figures)
  const bare = figures[names[0]]
  // Paired runs keep the reference measured beside each variant; earlier
  // runs measured it apart, as the first variant.
  const paired = bare.referenceRps !== undefined
  const ratios = (n: string, k: 'rps' | 'cpu') => {
    const reference = paired ? (k === 'rps' ? figures[n].referenceRps : figures[n].referenceCpu) as number[] : bare[k]
    return figures[n][k].map((x, i) => x / reference[i])
  }
  const title = r.tables[0].title.replace(/medians of per-(round|pair) ratios/, (_, unit: string) => `median (min-max, n runs) of per-${unit} ratios`)
  return {
    tables: [{
      title,
      columns: ['variant', 'req/s', 'server CPU µs/req', 'req/s ratio', 'CPU/req ratio'],
      rows: names.map((n, i) => [n, formatSpread(spread(figures[n].rps), 0), formatSpread(spread(figures[n].cpu), 2),
        i === 0 && !paired ? '1 (reference)' : formatSpread(spread(ratios(n, 'rps')), 3), i === 0 && !paired ? '1 (reference)' : formatSpread(spread(ratios(n, 'cpu')), 3)])
    }],
    charts: [costBars('Server CPU per hello-world request', figures)],
    notes: paired ? ['Each variant ran at the same time as bare Fastify, each server with a generator of its own; ratios are per pair. The A/A row is bare Fastify beside itself: ratios within its spread are noise.'] : []
  }
}

function memory (r: ScenarioResult): Presented {
  const rows = r.data as Row[]
  return {
    tables: r.tables,
    charts: [line('Live memory per connection, by state', 'connections', 'KiB per connection (heap + buffers after GC)', lines(rows, 'state', 'connections', 'liveKiBPerConnection'))],
    notes: []
  }
}

function backlog (r: ScenarioResult): Presented {
  const rows = r.data as Array<Array<string | number>>
  const count = (v: string | number) => (typeof v === 'number' ? v : null)
  return {
    tables: r.tables,
    charts: [{
      kind: 'bars',
      title: 'Kernel counters by listen backlog',
      x: 'backlog',
      y: 'count (whole machine)',
      categories: rows.map((row) => `backlog ${row[0]}`),
      series: [{ name: 'listen overflows', points: rows.map((row, i) => [i, count(row[1])]) }, { name: 'SYN retransmits', points: rows.map((row, i) => [i, count(row[2])]) }]
    }],
    notes: rows.some((row) => typeof row[1] !== 'number') ? ['nstat was not available: the kernel counters are missing, not zero.'] : []
  }
}

const byConnectionsAndVariant = (row: Array<string | number>) => `${row[0]}|${row[1]}`

function retryStorm (r: ScenarioResult): Presented {
  const runs = r.data as Runs
  return {
    tables: [withSpread(r.tables[0], runs, '2xx/s', 'okPerS', byConnectionsAndVariant), ...r.tables.slice(1)],
    charts: [line('Retry storm: 2xx per second (median, min-max)', 'connections', '2xx / s', spreadLines(runs, 'okPerS'), true)],
    notes: []
  }
}

function pooledClient (r: ScenarioResult): Presented {
  const runs = r.data as Runs
  const lag = (values: Array<Record<string, number>>) => saturation({ generatorLagP99: median(values.map((v) => v.generatorLagP99)) })
  const [main, ...rest] = r.tables
  const table: Table = { ...main, columns: [...main.columns, 'generator'], rows: main.rows.map((row) => [...row, lag(runs[`${String(row[0]).replace(/x$/, '')}|${row[1]}`] ?? []) ?? 'kept up']) }
  return {
    tables: [table, ...rest],
    charts: [
      line('Pooled client: goodput, % of measured capacity (median, min-max)', 'offered load (x capacity)', '%', spreadLines(runs, 'goodputPct', lag)),
      line('Pooled client: client timeouts (median, min-max)', 'offered load (x capacity)', 'timeouts', spreadLines(runs, 'timeouts', lag))
    ],
    notes: []
  }
}

const VIEWS: Record<string, (r: ScenarioResult) => Presented> = {
  goodput, threads, deadlock, 'reject-cost': rejectCost, bench, memory, backlog, 'retry-storm': retryStorm, 'pooled-client': pooledClient
}

/** The tables, charts and notes the report shows for one result. */
export function present (r: ScenarioResult): Presented {
  const view = VIEWS[r.scenario]
  if (view !== undefined) return view(r)
  return { tables: r.tables.map(markNoAnswers), charts: r.charts, notes: [] }
}
