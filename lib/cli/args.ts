// Flags of `tune`: parsed, checked, and turned into sweep options. Every
// mistake is a UsageError whose message names the flag and the value.
import { readFile } from 'node:fs/promises'
import { parseArgs } from 'node:util'
import { levelsUpTo, statusMatcher } from './sweep.js'

export class UsageError extends Error {}

export interface TuneFlags {
  url: URL
  method: string
  headers: Record<string, string | string[]>
  body?: Buffer
  ca?: Buffer
  expectStatus: string
  timeoutMs: number
  max: number
  levels: number[]
  stepSeconds: number
  maxSeconds: number
  maxRequests: number
  maxWaitMs?: number
  json: boolean
  iOwnThisHost: boolean
}

export const DEFAULTS = {
  method: 'GET',
  expectStatus: '2xx',
  timeoutMs: 10_000,
  max: 256,
  stepSeconds: 3,
  maxSeconds: 60,
  maxRequests: 1_000_000
}

/** Most requests in flight (each is a connection). */
export const MAX_CONCURRENCY = 10_000

export const TUNE_HELP = `Usage: fastify-concurrency-limit tune <url> [flags]

Sweeps concurrency against your running endpoint: 1, 2, 4, ... requests kept
in flight, each level for --step-seconds. Stops where throughput stops growing
and latency climbs, prints the measured curve, and recommends maxConcurrency,
maxQueue and queueTimeout for fastify-concurrency-limit.

It sends real load. Point it at a server you run, with the plugin's limit off
or far above the levels swept. Only loopback hosts (localhost, 127.0.0.0/8,
::1) are accepted unless --i-own-this-host is given.

Request:
  --method <verb>          HTTP method (default ${DEFAULTS.method})
  --header <name:value>    a request header; repeat the flag for more
  --body <text>            request body
  --body-file <path>       request body read from a file
  --expect-status <list>   statuses that count as success, e.g. 200,204 or 2xx,304
                           (default ${DEFAULTS.expectStatus})
  --timeout <ms>           a request unanswered after this long is an error
                           (default ${DEFAULTS.timeoutMs})
  --ca <path>              PEM certificate to trust for https (a self-signed one)

Sweep:
  --max <n>                highest concurrency (default ${DEFAULTS.max}, at most ${MAX_CONCURRENCY})
  --step-seconds <s>       time at each level (default ${DEFAULTS.stepSeconds})
  --max-seconds <s>        bound on the whole sweep (default ${DEFAULTS.maxSeconds})
  --max-requests <n>       bound on the requests sent (default ${DEFAULTS.maxRequests})

Recommendation:
  --max-wait <ms>          longest a request should wait in the queue: sets maxQueue
                           (default: one service time, so maxQueue = maxConcurrency)

Output and safety:
  --json                   the result as JSON on stdout (progress goes to stderr)
  --i-own-this-host        allow a host that is not loopback; the load is yours to answer for
  -h, --help               this help

Exit status: 0 with a recommendation; 1 when none could be made (the first
request failed, or no level was measured cleanly); 2 for a bad flag or a
refused host; 130 after Ctrl-C, once what was measured is printed.
`

const FLAGS = {
  method: { type: 'string' },
  header: { type: 'string', multiple: true },
  body: { type: 'string' },
  'body-file': { type: 'string' },
  'expect-status': { type: 'string' },
  timeout: { type: 'string' },
  ca: { type: 'string' },
  max: { type: 'string' },
  'step-seconds': { type: 'string' },
  'max-seconds': { type: 'string' },
  'max-requests': { type: 'string' },
  'max-wait': { type: 'string' },
  json: { type: 'boolean' },
  'i-own-this-host': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' }
} as const

/** An HTTP token: a method or a header name. */
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/

interface NumberRule {
  integer?: boolean
  min: number
  max?: number
}

function number (flag: string, value: string | undefined, fallback: number, rule: NumberRule): number {
  if (value === undefined) return fallback
  const n = Number(value)
  const fits = value.trim() !== '' && Number.isFinite(n) &&
    (rule.integer !== true || Number.isInteger(n)) &&
    n >= rule.min &&
    (rule.max === undefined || n <= rule.max)
  if (fits) return n
  const kind = rule.integer === true ? 'an integer' : 'a number'
  const range = rule.max === undefined ? `>= ${rule.min}` : `from ${rule.min} to ${rule.max}`
  throw new UsageError(`--${flag} must be ${kind} ${range}, received ${JSON.stringify(value)}`)
}

async function read (flag: string, path: string): Promise<Buffer> {
  try {
    return await readFile(path)
  } catch (err) {
    throw new UsageError(`--${flag}: cannot read ${path}: ${(err as Error).message}`)
  }
}

/**
 * `--max -5` as `--max=-5`: parseArgs takes a value that starts with a dash
 * for a flag and calls it ambiguous, where the number's own check says
 * what is wrong with it. Any flag that takes a value takes a negative
 * number so (`--body -1` sends "-1").
 */
function joinNegatives (argv: string[]): string[] {
  const args: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith('--') ? argv[i].slice(2) : ''
    const next = argv[i + 1]
    if (Object.hasOwn(FLAGS, name) && FLAGS[name as keyof typeof FLAGS].type === 'string' && next !== undefined && /^-\.?\d/.test(next)) {
      args.push(`${argv[i]}=${next}`)
      i++
    } else {
      args.push(argv[i])
    }
  }
  return args
}

/** Parses the flags after `tune`; undefined for --help. */
export async function parseTuneArgs (argv: string[]): Promise<TuneFlags | undefined> {
  let parsed
  try {
    parsed = parseArgs({ args: joinNegatives(argv), options: FLAGS, allowPositionals: true, strict: true })
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const { values, positionals } = parsed
  if (values.help === true) return undefined

  if (positionals.length === 0) throw new UsageError('the URL of the endpoint to tune is missing, e.g. tune http://127.0.0.1:3000/route')
  if (positionals.length > 1) throw new UsageError(`one URL is expected, received ${positionals.length}: ${positionals.join(' ')}`)
  const url = URL.canParse(positionals[0]) ? new URL(positionals[0]) : undefined
  if (url?.protocol !== 'http:' && url?.protocol !== 'https:') {
    throw new UsageError(`the URL must start with http:// or https://, received ${JSON.stringify(positionals[0])}`)
  }

  const method = (values.method ?? DEFAULTS.method).toUpperCase()
  if (!TOKEN.test(method)) throw new UsageError(`--method must be an HTTP method, received ${JSON.stringify(values.method)}`)

  const headers: Record<string, string | string[]> = {}
  for (const header of values.header ?? []) {
    const colon = header.indexOf(':')
    const name = header.slice(0, colon).trim().toLowerCase()
    if (colon < 0 || !TOKEN.test(name)) throw new UsageError(`--header must be name:value, received ${JSON.stringify(header)}`)
    const value = header.slice(colon + 1).trim()
    const previous = headers[name]
    headers[name] = previous === undefined ? value : [previous, value].flat()
  }

  if (values.body !== undefined && values['body-file'] !== undefined) throw new UsageError('give --body or --body-file, not both')
  const body = values['body-file'] !== undefined
    ? await read('body-file', values['body-file'])
    : values.body === undefined ? undefined : Buffer.from(values.body)

  const expectStatus = values['expect-status'] ?? DEFAULTS.expectStatus
  if (statusMatcher(expectStatus) === undefined) {
    throw new UsageError(`--expect-status must list statuses (100-599) or classes (1xx-5xx), e.g. 200,204 or 2xx, received ${JSON.stringify(expectStatus)}`)
  }

  const max = number('max', values.max, DEFAULTS.max, { integer: true, min: 1, max: MAX_CONCURRENCY })
  const stepSeconds = number('step-seconds', values['step-seconds'], DEFAULTS.stepSeconds, { min: 0.1, max: 3600 })
  const maxSeconds = number('max-seconds', values['max-seconds'], DEFAULTS.maxSeconds, { min: 0.1, max: 86_400 })
  if (maxSeconds < stepSeconds) throw new UsageError(`--max-seconds (${maxSeconds}) must be at least --step-seconds (${stepSeconds})`)
  const maxWait = values['max-wait']

  return {
    url,
    method,
    headers,
    body,
    ca: values.ca === undefined ? undefined : await read('ca', values.ca),
    expectStatus,
    timeoutMs: number('timeout', values.timeout, DEFAULTS.timeoutMs, { integer: true, min: 1, max: 2 ** 31 - 1 }),
    max,
    levels: levelsUpTo(max),
    stepSeconds,
    maxSeconds,
    maxRequests: number('max-requests', values['max-requests'], DEFAULTS.maxRequests, { integer: true, min: 1 }),
    maxWaitMs: maxWait === undefined ? undefined : number('max-wait', maxWait, 0, { min: 0 }),
    json: values.json === true,
    iOwnThisHost: values['i-own-this-host'] === true
  }
}
