// The `fastify-concurrency-limit` command: argv in, text out, an exit status
// back. The process itself is touched only by run().
import { parseTuneArgs, TUNE_HELP, UsageError, type TuneFlags } from './args.js'
import { banner, buildReport, progressLine, renderText } from './report.js'
import { sweep } from './sweep.js'
import { notLoopback, resolveAll, type Resolve } from './target.js'

export interface Io {
  stdout: (text: string) => void
  stderr: (text: string) => void
  /** Aborting it stops a sweep, which then prints what it measured (Ctrl-C). */
  signal?: AbortSignal
  /** Resolves a host name; by default the system resolver. */
  resolve?: Resolve
}

export const HELP = `Usage: fastify-concurrency-limit <command> [flags]

Commands:
  tune <url>   measure your endpoint and recommend maxConcurrency, maxQueue and queueTimeout

Run "fastify-concurrency-limit tune --help" for its flags.
`

export const EXIT = { ok: 0, noRecommendation: 1, usage: 2, interrupted: 130 } as const

/** Runs the command of `argv` (the arguments after the program) and returns its exit status. */
export async function main (argv: string[], io: Io): Promise<number> {
  const [command, ...rest] = argv
  if (command === '--help' || command === '-h' || command === 'help') {
    io.stdout(HELP)
    return EXIT.ok
  }
  if (command !== 'tune') {
    io.stderr((command === undefined ? 'a command is missing\n\n' : `unknown command ${JSON.stringify(command)}\n\n`) + HELP)
    return EXIT.usage
  }
  let flags: TuneFlags | undefined
  try {
    flags = await parseTuneArgs(rest)
    if (flags !== undefined && !flags.iOwnThisHost) {
      const refused = await notLoopback(flags.url, io.resolve ?? resolveAll)
      if (refused !== undefined) {
        throw new UsageError(`refusing to load ${flags.url.host}: ${refused}. tune sends real load; only loopback hosts are accepted unless you pass --i-own-this-host`)
      }
    }
  } catch (err) {
    // Only UsageErrors come out of parsing and the host check.
    io.stderr(`tune: ${(err as UsageError).message}\nRun "fastify-concurrency-limit tune --help" for the flags.\n`)
    return EXIT.usage
  }
  if (flags === undefined) {
    io.stdout(TUNE_HELP)
    return EXIT.ok
  }
  return tune(flags, io)
}

async function tune (flags: TuneFlags, io: Io): Promise<number> {
  io.stderr(banner(flags))
  const result = await sweep({
    url: flags.url,
    method: flags.method,
    headers: flags.headers,
    body: flags.body,
    ca: flags.ca,
    expectStatus: flags.expectStatus,
    levels: flags.levels,
    stepMs: flags.stepSeconds * 1000,
    maxMs: flags.maxSeconds * 1000,
    maxRequests: flags.maxRequests,
    timeoutMs: flags.timeoutMs,
    signal: io.signal,
    onStep: (step) => io.stderr(progressLine(step))
  })
  const report = buildReport(flags, result)
  io.stdout(flags.json ? JSON.stringify(report, null, 2) + '\n' : '\n' + renderText(report))
  if (result.stoppedBy === 'interrupted') return EXIT.interrupted
  return report.recommendation === undefined ? EXIT.noRecommendation : EXIT.ok
}

/** What run() needs of `process`. */
export interface CliProcess {
  argv: string[]
  exitCode?: number | string | null | undefined
  stdout: { write: (text: string) => unknown }
  stderr: { write: (text: string) => unknown }
  on: (event: 'SIGINT', listener: () => void) => unknown
  off: (event: 'SIGINT', listener: () => void) => unknown
  exit: (code: number) => void
}

/**
 * The command line: Ctrl-C once stops the sweep and prints what it measured,
 * twice quits at once.
 */
export async function run (proc: CliProcess = process): Promise<void> {
  const interrupt = new AbortController()
  const onSigint = (): void => {
    if (interrupt.signal.aborted) {
      proc.exit(EXIT.interrupted)
      return
    }
    proc.stderr.write('\nStopping; Ctrl-C again quits at once.\n')
    interrupt.abort()
  }
  proc.on('SIGINT', onSigint)
  try {
    proc.exitCode = await main(proc.argv.slice(2), {
      stdout: (text) => proc.stdout.write(text),
      stderr: (text) => proc.stderr.write(text),
      signal: interrupt.signal
    })
  } finally {
    proc.off('SIGINT', onSigint)
  }
}
