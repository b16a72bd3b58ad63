// Output of a run: terminal tables, markdown for $GITHUB_STEP_SUMMARY, and a
// self-contained HTML report with SVG charts (no scripts, no external files).
import { appendFileSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

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
  points: Array<[number, number]>
}

export interface Chart {
  title: string
  x: string
  y: string
  logX?: boolean
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

export function svgChart (chart: Chart): string {
  const w = 640
  const h = 320
  const m = { l: 64, r: 150, t: 30, b: 44 }
  const all = chart.series.flatMap((s) => s.points)
  const fx = (x: number) => (chart.logX === true ? Math.log10(x) : x)
  const xs = all.map((p) => fx(p[0]))
  const x0 = Math.min(...xs)
  const x1 = Math.max(...xs)
  const y1 = niceCeil(Math.max(...all.map((p) => p[1])))
  const px = (x: number) => m.l + ((fx(x) - x0) / ((x1 - x0) || 1)) * (w - m.l - m.r)
  const py = (y: number) => h - m.b - (y / y1) * (h - m.t - m.b)
  const ticks = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b)
  let svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="sans-serif" font-size="11"><rect width="${w}" height="${h}" fill="#fff"/>`
  svg += `<text x="${w / 2 - m.r / 2}" y="16" text-anchor="middle" font-size="13">${chart.title}</text>`
  svg += `<line x1="${m.l}" y1="${h - m.b}" x2="${w - m.r}" y2="${h - m.b}" stroke="#444"/><line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${h - m.b}" stroke="#444"/>`
  for (const x of ticks.length > 12 ? ticks.filter((_, i) => i % Math.ceil(ticks.length / 12) === 0) : ticks) {
    svg += `<text x="${px(x)}" y="${h - m.b + 14}" text-anchor="middle">${x}</text>`
  }
  for (let i = 0; i <= 5; i++) {
    const y = (y1 / 5) * i
    svg += `<line x1="${m.l}" y1="${py(y)}" x2="${w - m.r}" y2="${py(y)}" stroke="#eee"/><text x="${m.l - 4}" y="${py(y) + 4}" text-anchor="end">${Number.isInteger(y) ? y : y.toFixed(1)}</text>`
  }
  svg += `<text x="${(m.l + w - m.r) / 2}" y="${h - 8}" text-anchor="middle">${chart.x}</text>`
  svg += `<text x="14" y="${(m.t + h - m.b) / 2}" text-anchor="middle" transform="rotate(-90 14 ${(m.t + h - m.b) / 2})">${chart.y}</text>`
  chart.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length]
    svg += `<polyline fill="none" stroke="${color}" stroke-width="2" points="${s.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(' ')}"/>`
    for (const p of s.points) svg += `<circle cx="${px(p[0]).toFixed(1)}" cy="${py(p[1]).toFixed(1)}" r="2.5" fill="${color}"/>`
    svg += `<rect x="${w - m.r + 10}" y="${m.t + i * 18}" width="12" height="3" fill="${color}"/><text x="${w - m.r + 26}" y="${m.t + i * 18 + 5}">${s.name}</text>`
  })
  return svg + '</svg>'
}

export interface ScenarioResult {
  scenario: string
  title: string
  options: Record<string, unknown>
  machine: { cores: number, node: string, platform: string, date: string }
  tables: Table[]
  charts: Chart[]
  data: unknown
}

function escape (s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;')
}

/** Writes report.html and summary.md from every scenario JSON in the results folder. */
export function writeHtmlReport (dir: string): string {
  const results = readdirSync(dir).filter((f) => f.endsWith('.json')).sort()
    .map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as ScenarioResult)
  for (const r of results) r.charts.forEach((chart, i) => writeFileSync(join(dir, `${r.scenario}-${i + 1}.svg`), svgChart(chart)))
  const summary = results.map((r) => `## ${r.title}\n\n${r.machine.cores} cores, Node ${r.machine.node}, ${r.machine.date}\n\n${r.tables.map(markdownTable).join('\n')}`).join('\n')
  writeFileSync(join(dir, 'summary.md'), summary)
  let html = '<!doctype html><meta charset="utf-8"><title>fastify-concurrency-limit load tests</title>'
  html += '<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}</style>'
  html += '<h1>fastify-concurrency-limit load tests</h1>'
  for (const r of results) {
    html += `<h2>${escape(r.title)}</h2><p>${r.machine.cores} cores, Node ${r.machine.node}, ${r.machine.date}. Options: <code>${escape(JSON.stringify(r.options))}</code></p>`
    for (const t of r.tables) {
      html += `<h3>${escape(t.title)}</h3><table><tr>${t.columns.map((c) => `<th>${escape(c)}</th>`).join('')}</tr>`
      html += t.rows.map((row) => `<tr>${row.map((v) => `<td>${escape(cell(v))}</td>`).join('')}</tr>`).join('') + '</table>'
    }
    for (const c of r.charts) html += `<div>${svgChart(c)}</div>`
  }
  const file = join(dir, 'report.html')
  writeFileSync(file, html)
  return file
}
