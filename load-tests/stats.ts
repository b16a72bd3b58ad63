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
