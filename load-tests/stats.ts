export interface Latency {
  p50: number
  p99: number
  max: number
}

export function percentile (sorted: number[], p: number): number {
  if (sorted.length === 0) return 0
  const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)
  return sorted[Math.max(0, index)]
}

export function summarize (values: number[]): Latency {
  const sorted = Float64Array.from(values).sort()
  const list = Array.from(sorted)
  return { p50: percentile(list, 50), p99: percentile(list, 99), max: list.length === 0 ? 0 : list[list.length - 1] }
}

export function median (values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

/** The median of repeated runs with the range they covered. */
export interface Spread {
  median: number
  min: number
  max: number
  n: number
}

/** The spread of the finite values, or null when there is none (no answers). */
export function spread (values: number[]): Spread | null {
  const finite = values.filter((v) => Number.isFinite(v))
  if (finite.length === 0) return null
  return { median: median(finite), min: Math.min(...finite), max: Math.max(...finite), n: finite.length }
}

/** 1234.5 -> "1,234.5" with a fixed number of decimals. */
export function formatNumber (value: number, digits = 1): string {
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits })
}

/** "4,772 (4,512–4,901, n=3)"; a single run is its value; no values, "no answers". */
export function formatSpread (s: Spread | null, digits = 1): string {
  if (s === null) return 'no answers'
  if (s.n === 1) return formatNumber(s.median, digits)
  return `${formatNumber(s.median, digits)} (${formatNumber(s.min, digits)}–${formatNumber(s.max, digits)}, n=${s.n})`
}
