/**
 * A strict reader of Prometheus's text exposition format (version 0.0.4):
 * every line must be a HELP, a TYPE or a sample of a declared family, or
 * it throws. Enough to check what a scrape would read.
 */
export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

export interface Exposition {
  types: Map<string, string>
  help: Map<string, string>
  samples: Sample[]
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*'
const HELP = new RegExp(`^# HELP (${NAME}) (.*)$`)
const TYPE = new RegExp(`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`)
const SAMPLE = new RegExp(`^(${NAME})(?:\\{(.*)\\})? (\\S+)(?: -?\\d+)?$`)
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/y
const SUFFIXES: Record<string, string[]> = {
  counter: [''],
  gauge: [''],
  untyped: [''],
  histogram: ['_bucket', '_sum', '_count'],
  summary: ['', '_sum', '_count']
}

function parseValue (text: string, line: string): number {
  if (text === '+Inf') return Infinity
  if (text === '-Inf') return -Infinity
  if (text === 'NaN') return NaN
  const value = Number(text)
  if (text === '' || Number.isNaN(value)) throw new Error(`not a sample value: ${line}`)
  return value
}

function parseLabels (text: string | undefined, line: string): Record<string, string> {
  const labels: Record<string, string> = {}
  if (text === undefined || text === '') return labels
  LABEL.lastIndex = 0
  while (LABEL.lastIndex < text.length) {
    const at = LABEL.lastIndex
    const m = LABEL.exec(text)
    if (m === null || m.index !== at) throw new Error(`bad labels: ${line}`)
    if (m[1] in labels) throw new Error(`label repeated: ${line}`)
    labels[m[1]] = m[2].replace(/\\(["\\n])/g, (_all, c: string) => c === 'n' ? '\n' : c)
  }
  return labels
}

export function parseExposition (text: string): Exposition {
  const types = new Map<string, string>()
  const help = new Map<string, string>()
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    let m = HELP.exec(line)
    if (m !== null) {
      if (help.has(m[1])) throw new Error(`HELP repeated: ${line}`)
      help.set(m[1], m[2])
      continue
    }
    m = TYPE.exec(line)
    if (m !== null) {
      if (types.has(m[1])) throw new Error(`TYPE repeated: ${line}`)
      types.set(m[1], m[2])
      continue
    }
    if (line.startsWith('#')) throw new Error(`unknown comment: ${line}`)
    m = SAMPLE.exec(line)
    if (m === null) throw new Error(`not a sample: ${line}`)
    const name = m[1]
    const family = [...types].find(([base, type]) => SUFFIXES[type].some((suffix) => base + suffix === name))
    if (family === undefined) throw new Error(`sample of no declared family: ${line}`)
    const labels = parseLabels(m[2], line)
    if (family[1] === 'histogram' && name.endsWith('_bucket') && labels.le === undefined) throw new Error(`bucket without le: ${line}`)
    samples.push({ name, labels, value: parseValue(m[3], line) })
  }
  return { types, help, samples }
}

/** The value of the one sample with this name and these labels (exactly), or undefined. */
export function valueOf (exposition: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  const keys = Object.keys(labels)
  const found = exposition.samples.filter((s) =>
    s.name === name && Object.keys(s.labels).length === keys.length && keys.every((k) => s.labels[k] === labels[k]))
  if (found.length > 1) throw new Error(`${found.length} samples of ${name} ${JSON.stringify(labels)}`)
  return found[0]?.value
}
