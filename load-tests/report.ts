// Output of a run: terminal tables, markdown for $GITHUB_STEP_SUMMARY, and a
// self-contained HTML report with SVG charts (no scripts, no external files).
// What each scenario shows, and in which order, is in present.ts.
import { appendFileSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { orderResults, present } from './present.js'

export interface Table {
  title: string
  columns: string[]
  rows: Array<Array<string | number>>
}

function cell (value: string | number): string {
  return typeof value === 'number' ? (Number.isInteger(value) ? String(value) : value.toFixed(1)) : value
}

export function printTable (table: Table): void {
  const rows = [table.columns, ...table.rows.map((r) => r.map(cell))]
  const widths = table.columns.map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)))
  const line = (r: Array<string | number>) => r.map((v, i) => String(v).padStart(widths[i])).join('  ')
  console.log(`\n${table.title}`)
  console.log(line(rows[0]))
  console.log(widths.map((w) => '-'.repeat(w)).join('  '))
  for (const r of rows.slice(1)) console.log(line(r))
}

export function markdownTable (table: Table): string {
  const head = `| ${table.columns.join(' | ')} |\n|${table.columns.map(() => '---').join('|')}|\n`
  return `### ${table.title}\n\n${head}${table.rows.map((r) => `| ${r.map(cell).join(' | ')} |`).join('\n')}\n`
}

export function stepSummary (tables: Table[]): void {
  const file = process.env.GITHUB_STEP_SUMMARY
  if (file === undefined || file === '') return
  appendFileSync(file, tables.map(markdownTable).join('\n') + '\n')
}

export interface Series {
  name: string
  /** y is null where there is nothing to show (no answers, no data): drawn as such, never as 0. */
  points: Array<[number, number | null]>
  /** Min-max of the repeated runs, per point. */
  ranges?: Array<[number, number] | null>
  /** Why a point is not a finding (a saturated generator), per point: drawn hollow. */
  notes?: Array<string | null>
  /** What a null point means; "no answers" unless told. */
  missing?: string
}

export interface Chart {
  title: string
  x: string
  y: string
  logX?: boolean
  /** Lines over a numeric x (default), or horizontal bars, one group per category (x is the index). */
  kind?: 'line' | 'bars'
  categories?: string[]
  /** A floor drawn across the bars. */
  reference?: { value: number, label: string }
  series: Series[]
}

const COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b']

/** The smallest 1, 2, 2.5 or 5 x 10^k at or above `value`: an axis top with round ticks. */
export function niceCeil (value: number): number {
  if (!(value > 0)) return 1
  const pow = 10 ** Math.floor(Math.log10(value))
  const n = value / pow
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * pow
}

function escape (s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;')
}

const tick = (y: number) => (Number.isInteger(y) ? String(y) : y.toFixed(1))

/** The top of the value axis: every median, range and reference line fits under it. */
function top (chart: Chart): number {
  const values = chart.series.flatMap((s) => [...s.points.map((p) => p[1] ?? 0), ...(s.ranges ?? []).map((r) => r?.[1] ?? 0)])
  return niceCeil(Math.max(...values, chart.reference?.value ?? 0))
}

/** What the hollow and crossed markers of a chart mean, for its legend. */
function markerLegend (chart: Chart): string[] {
  const notes = new Set(chart.series.flatMap((s) => (s.notes ?? []).filter((n): n is string => n !== null).map((n) => n.replace(/ \(.*$/, ''))))
  const missing = new Set(chart.series.flatMap((s) => (s.points.some((p) => p[1] === null) ? [s.missing ?? 'no answers'] : [])))
  return [...[...notes].map((n) => `○ ${n}`), ...[...missing].map((m) => `× ${m}`)]
}

export function svgChart (chart: Chart): string {
  return chart.kind === 'bars' ? svgBars(chart) : svgLines(chart)
}

function svgLines (chart: Chart): string {
  const w = 640
  const h = 320
  const m = { l: 64, r: 170, t: 30, b: 44 }
  const all = chart.series.flatMap((s) => s.points)
  const fx = (x: number) => (chart.logX === true ? Math.log10(x) : x)
  const xs = all.map((p) => fx(p[0]))
  const x0 = Math.min(...xs)
  const x1 = Math.max(...xs)
  const y1 = top(chart)
  const px = (x: number) => m.l + ((fx(x) - x0) / ((x1 - x0) || 1)) * (w - m.l - m.r)
  const py = (y: number) => h - m.b - (y / y1) * (h - m.t - m.b)
  const f = (n: number) => n.toFixed(1)
  const ticks = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b)
  let svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="sans-serif" font-size="11"><rect width="${w}" height="${h}" fill="#fff"/>`
  svg += `<text x="${w / 2 - m.r / 2}" y="16" text-anchor="middle" font-size="13">${escape(chart.title)}</text>`
  svg += `<line x1="${m.l}" y1="${h - m.b}" x2="${w - m.r}" y2="${h - m.b}" stroke="#444"/><line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${h - m.b}" stroke="#444"/>`
  for (const x of ticks.length > 12 ? ticks.filter((_, i) => i % Math.ceil(ticks.length / 12) === 0) : ticks) {
    svg += `<text x="${f(px(x))}" y="${h - m.b + 14}" text-anchor="middle">${x}</text>`
  }
  for (let i = 0; i <= 5; i++) {
    const y = (y1 / 5) * i
    svg += `<line x1="${m.l}" y1="${f(py(y))}" x2="${w - m.r}" y2="${f(py(y))}" stroke="#eee"/><text x="${m.l - 4}" y="${f(py(y) + 4)}" text-anchor="end">${tick(y)}</text>`
  }
  svg += `<text x="${(m.l + w - m.r) / 2}" y="${h - 8}" text-anchor="middle">${escape(chart.x)}</text>`
  svg += `<text x="14" y="${(m.t + h - m.b) / 2}" text-anchor="middle" transform="rotate(-90 14 ${(m.t + h - m.b) / 2})">${escape(chart.y)}</text>`
  chart.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length]
    // A gap where there is no answer: the line never passes through a false 0.
    const segments: Array<Array<[number, number]>> = [[]]
    for (const [x, y] of s.points) {
      if (y === null) segments.push([])
      else segments[segments.length - 1].push([x, y])
    }
    for (const seg of segments.filter((p) => p.length > 1)) {
      svg += `<polyline fill="none" stroke="${color}" stroke-width="2" points="${seg.map(([x, y]) => `${f(px(x))},${f(py(y))}`).join(' ')}"/>`
    }
    s.points.forEach(([x, y], j) => {
      const range = s.ranges?.[j]
      if (range !== undefined && range !== null) svg += `<line x1="${f(px(x))}" y1="${f(py(range[0]))}" x2="${f(px(x))}" y2="${f(py(range[1]))}" stroke="${color}"/>`
      if (y === null) {
        svg += `<text x="${f(px(x))}" y="${h - m.b - 4}" text-anchor="middle" fill="${color}" font-size="13"><title>${escape(s.name)}: ${escape(s.missing ?? 'no answers')}</title>×</text>`
        return
      }
      const note = s.notes?.[j]
      svg += note === undefined || note === null
        ? `<circle cx="${f(px(x))}" cy="${f(py(y))}" r="2.5" fill="${color}"/>`
        : `<circle cx="${f(px(x))}" cy="${f(py(y))}" r="4" fill="#fff" stroke="${color}" stroke-width="1.5"><title>${escape(note)}</title></circle>`
    })
    svg += `<rect x="${w - m.r + 10}" y="${m.t + i * 18}" width="12" height="3" fill="${color}"/><text x="${w - m.r + 26}" y="${m.t + i * 18 + 5}">${escape(s.name)}</text>`
  })
  markerLegend(chart).forEach((text, i) => {
    svg += `<text x="${w - m.r + 10}" y="${m.t + (chart.series.length + i) * 18 + 10}" fill="#444">${escape(text)}</text>`
  })
  return svg + '</svg>'
}

function svgBars (chart: Chart): string {
  const categories = chart.categories ?? []
  const w = 640
  const bar = 14
  const group = chart.series.length * bar + 12
  const m = { l: 210, r: 150, t: 30, b: 44 }
  const h = m.t + categories.length * group + m.b
  const x1 = top(chart)
  const px = (v: number) => m.l + (v / x1) * (w - m.l - m.r)
  const f = (n: number) => n.toFixed(1)
  let svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="sans-serif" font-size="11"><rect width="${w}" height="${h}" fill="#fff"/>`
  svg += `<text x="${w / 2 - m.r / 2}" y="16" text-anchor="middle" font-size="13">${escape(chart.title)}</text>`
  for (let i = 0; i <= 5; i++) {
    const v = (x1 / 5) * i
    svg += `<line x1="${f(px(v))}" y1="${m.t}" x2="${f(px(v))}" y2="${h - m.b}" stroke="#eee"/><text x="${f(px(v))}" y="${h - m.b + 14}" text-anchor="middle">${tick(v)}</text>`
  }
  svg += `<line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${h - m.b}" stroke="#444"/>`
  svg += `<text x="${(m.l + w - m.r) / 2}" y="${h - 8}" text-anchor="middle">${escape(chart.y)}</text>`
  categories.forEach((c, k) => {
    svg += `<text x="${m.l - 6}" y="${m.t + k * group + group / 2 + 2}" text-anchor="end">${escape(c)}</text>`
  })
  chart.series.forEach((s, i) => {
    const color = COLORS[(i + 1) % COLORS.length]
    for (const [k, v] of s.points) {
      const y = m.t + k * group + 6 + i * bar
      if (v === null) {
        svg += `<text x="${m.l + 4}" y="${y + bar - 4}" fill="#444">${escape(s.missing ?? 'no answers')}</text>`
        continue
      }
      svg += `<rect x="${m.l}" y="${y}" width="${f(px(v) - m.l)}" height="${bar - 2}" fill="${color}"/>`
      const range = s.ranges?.[k]
      if (range !== undefined && range !== null) svg += `<line x1="${f(px(range[0]))}" y1="${y + (bar - 2) / 2}" x2="${f(px(range[1]))}" y2="${y + (bar - 2) / 2}" stroke="#000"/>`
      svg += `<text x="${f(px(range?.[1] ?? v) + 4)}" y="${y + bar - 4}">${tick(Math.round(v * 100) / 100)}</text>`
    }
    if (chart.series.length > 1) svg += `<rect x="${w - m.r + 10}" y="${m.t + i * 18}" width="12" height="8" fill="${color}"/><text x="${w - m.r + 26}" y="${m.t + i * 18 + 8}">${escape(s.name)}</text>`
  })
  if (chart.reference !== undefined) {
    const x = f(px(chart.reference.value))
    svg += `<line x1="${x}" y1="${m.t - 4}" x2="${x}" y2="${h - m.b}" stroke="#000" stroke-dasharray="4 3"/><text x="${w - m.r + 10}" y="${h - m.b - 4}">┆ floor: ${escape(chart.reference.label)}</text>`
  }
  return svg + '</svg>'
}

export interface ScenarioResult {
  scenario: string
  title: string
  /** The run that measured it (the lab process's start); older results have only machine.date. */
  run?: string
  options: Record<string, unknown>
  machine: { cores: number, node: string, platform: string, date: string }
  tables: Table[]
  charts: Chart[]
  data: unknown
}

export const runOf = (r: ScenarioResult): string => r.run ?? r.machine.date

/** The run most sections come from (the newest on a tie): the others are marked with their date. */
export function mainRun (results: ScenarioResult[]): string | undefined {
  const counts = new Map<string, number>()
  for (const r of results) counts.set(runOf(r), (counts.get(runOf(r)) ?? 0) + 1)
  return [...counts].sort((a, b) => b[1] - a[1] || b[0].localeCompare(a[0]))[0]?.[0]
}

export interface RenderedReport {
  html: string
  summary: string
  /** Chart files, named <scenario>-<n>.svg. */
  svgs: Array<{ file: string, svg: string }>
}

const date = (iso: string) => iso.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')

/**
 * The report of a results folder: sections in story order, and every section
 * that another run measured marked with its date. `current` is the run being
 * reported (this process's, when a scenario has just saved).
 */
export function renderReport (results: ScenarioResult[], current = mainRun(results)): RenderedReport {
  const sections = orderResults(results).map((r) => ({ r, view: present(r), other: current !== undefined && runOf(r) !== current }))
  const svgs = sections.flatMap(({ r, view }) => view.charts.map((chart, i) => ({ file: `${r.scenario}-${i + 1}.svg`, svg: svgChart(chart) })))
  const meta = (r: ScenarioResult) => `${r.machine.cores} cores, Node ${r.machine.node}, ${date(r.machine.date)}`
  const otherRun = (r: ScenarioResult) => `Not from this run: measured ${date(runOf(r))}.`
  const heading = current === undefined ? 'no results' : `run of ${date(current)}`
  let summary = `# fastify-concurrency-limit load tests: ${heading}\n`
  let html = '<!doctype html><meta charset="utf-8"><title>fastify-concurrency-limit load tests</title>'
  html += '<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}.other{background:#fff3cd;padding:4px 8px}.note{color:#7a4b00}</style>'
  html += `<h1>fastify-concurrency-limit load tests</h1><p>${escape(heading)}. Medians with (min–max, n runs) where a scenario repeats.</p>`
  html += `<ol>${sections.map(({ r, other }) => `<li><a href="#${r.scenario}">${escape(r.title)}</a>${other ? ` (measured ${escape(date(runOf(r)))})` : ''}</li>`).join('')}</ol>`
  for (const { r, view, other } of sections) {
    summary += `\n## ${r.title}\n\n${other ? `**${otherRun(r)}** ` : ''}${meta(r)}\n\n${view.tables.map(markdownTable).join('\n')}`
    summary += view.notes.map((n) => `\n> ${n}\n`).join('')
    summary += view.charts.map((c, i) => `\n![${c.title}](${r.scenario}-${i + 1}.svg)\n`).join('')
    html += `<h2 id="${r.scenario}">${escape(r.title)}</h2>${other ? `<p class="other">${escape(otherRun(r))}</p>` : ''}`
    html += `<p>${escape(meta(r))}. Options: <code>${escape(JSON.stringify(r.options))}</code></p>`
    for (const t of view.tables) {
      html += `<h3>${escape(t.title)}</h3><table><tr>${t.columns.map((c) => `<th>${escape(c)}</th>`).join('')}</tr>`
      html += t.rows.map((row) => `<tr>${row.map((v) => `<td>${escape(cell(v))}</td>`).join('')}</tr>`).join('') + '</table>'
    }
    html += view.notes.map((n) => `<p class="note">${escape(n)}</p>`).join('')
    for (const c of view.charts) html += `<div>${svgChart(c)}</div>`
  }
  return { html, summary, svgs }
}

/** Reads every scenario JSON in `dir`; writes report.html, summary.md and the charts beside them. */
export function writeHtmlReport (dir: string, current?: string): string {
  const results = readdirSync(dir).filter((f) => f.endsWith('.json')).sort()
    .map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as ScenarioResult)
    .filter((r) => typeof r.scenario === 'string')
  const report = renderReport(results, current ?? mainRun(results))
  for (const { file, svg } of report.svgs) writeFileSync(join(dir, file), svg)
  writeFileSync(join(dir, 'summary.md'), report.summary)
  const file = join(dir, 'report.html')
  writeFileSync(file, report.html)
  return file
}
