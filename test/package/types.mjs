// Type-checks a consumer of the built package under each module resolution
// a TypeScript user may have, strict and with the package's declarations
// checked (skipLibCheck off): the declarations must hold under all of them,
// not only under the NodeNext the package is built with.
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const tsc = join(root, 'node_modules/typescript/bin/tsc')
const dir = mkdtempSync(join(tmpdir(), 'fcl-types-'))

const consumer = `
import Fastify from 'fastify'
import concurrencyLimit, { InvalidOptionError, QueueFullError, type ConcurrencyLimitOptions } from 'fastify-concurrency-limit'

const options: ConcurrencyLimitOptions = { maxConcurrency: 10, maxQueue: 100, queueTimeout: 1000 }
const app = Fastify()
void app.register(concurrencyLimit, options)
app.get('/', { config: { concurrencyLimit: { maxConcurrency: 2 } } }, async () => app.concurrencyLimit.stats().inFlight)

// The error classes are typed, with their codes: not any.
const code: 'FST_CONCURRENCY_LIMIT_QUEUE_FULL' = new QueueFullError().code
const status: 503 = new QueueFullError().statusCode
const invalid: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION' = new InvalidOptionError('x').code
// @ts-expect-error the code is a string literal, not a number
const wrong: number = new QueueFullError().code
// @ts-expect-error not an option
void app.register(concurrencyLimit, { maxConcurency: 10 })
void [code, status, invalid, wrong]
`
const cluster = `
import { runCluster } from 'fastify-concurrency-limit/cluster'
void runCluster
`

// node10 reads no "exports": it has no subpath, so no cluster entry.
const setups = [
  { name: 'nodenext, ESM', type: 'module', options: { module: 'nodenext', moduleResolution: 'nodenext' }, cluster: true },
  { name: 'nodenext, CommonJS', type: 'commonjs', options: { module: 'nodenext', moduleResolution: 'nodenext' }, cluster: true },
  { name: 'node16, ESM', type: 'module', options: { module: 'node16', moduleResolution: 'node16' }, cluster: true },
  { name: 'bundler', type: 'module', options: { module: 'esnext', moduleResolution: 'bundler' }, cluster: true },
  { name: 'node10, CommonJS', type: 'commonjs', options: { module: 'commonjs', moduleResolution: 'node10', esModuleInterop: true }, cluster: false }
]

let failed = 0
try {
  for (const setup of setups) {
    const project = join(dir, setup.name.replace(/\W+/g, '-'))
    mkdirSync(join(project, 'node_modules'), { recursive: true })
    // The package as npm installs it, and what the consumer imports itself;
    // the declarations' own imports resolve from where the package really is.
    symlinkSync(root, join(project, 'node_modules/fastify-concurrency-limit'), 'dir')
    for (const dep of ['fastify', '@types']) {
      symlinkSync(join(root, 'node_modules', dep), join(project, 'node_modules', dep), 'dir')
    }
    writeFileSync(join(project, 'package.json'), JSON.stringify({ type: setup.type }))
    writeFileSync(join(project, 'app.ts'), consumer + (setup.cluster ? cluster : ''))
    writeFileSync(join(project, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { strict: true, skipLibCheck: false, noEmit: true, target: 'es2022', types: ['node'], ...setup.options },
      files: ['app.ts']
    }))
    try {
      execFileSync(process.execPath, [tsc, '-p', project], { encoding: 'utf8' })
      console.log(`types, ${setup.name}: ok`)
    } catch (err) {
      failed++
      console.error(`types, ${setup.name}: failed\n${err.stdout}${err.stderr}`)
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
}
if (failed > 0) process.exit(1)
