/**
 * A received value as an error message shows it: JSON where it has one,
 * except numbers and bigints, which JSON would show as null (NaN, Infinity)
 * or not at all.
 */
export function showValue (value: unknown): string {
  if (typeof value === 'function') return 'a function'
  if (typeof value === 'number' || typeof value === 'bigint') return String(value)
  try {
    return JSON.stringify(value) ?? String(value)
  } catch {
    return Object.prototype.toString.call(value)
  }
}
