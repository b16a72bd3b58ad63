import t from 'tap'
import { readFileSync, writeFileSync, rmSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import { client, get, sleep } from './helpers/server.js'

// README's quick start, run as written: only the package name (to this
// checkout's source), the port (to a free one) and the logger (silenced)
// change, and the app is exported so that the test can close it.
t.test('the quick start in README runs as written', async (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const section = readme.slice(readme.indexOf('## Quick start'))
  const block = /```ts\n([\s\S]*?)```/.exec(section)?.[1]
  if (block === undefined) throw new Error('no ts block in the quick start')
  t.match(block, /from 'fastify-concurrency-limit'/)
  t.match(block, /await app\.listen\(\{ port: 3000 \}\)/)
  const source = block
    .replace("from 'fastify-concurrency-limit'", `from '${fileURLToPath(new URL('../lib/index.js', import.meta.url))}'`)
    .replace('{ port: 3000 }', "{ port: 0, host: '127.0.0.1' }")
    .replace('Fastify({ logger: true })', "Fastify({ logger: { level: 'silent' } })") + '\nexport { app }\n'
  const file = fileURLToPath(new URL(`./.quickstart-${process.pid}.ts`, import.meta.url))
  writeFileSync(file, source)
  t.teardown(() => rmSync(file, { force: true }))
  const { app } = await import(file) as { app: FastifyInstance }
  t.teardown(() => app.close())
  const { port } = app.server.address() as { port: number }
  const pool = client(t, `http://127.0.0.1:${port}`)

  // Fourteen at once: 2 run, 10 wait, 2 are refused at once; those still
  // waiting after 1 s are refused then. The health check answers meanwhile.
  const reports = Array.from({ length: 14 }, () => get(pool, '/report'))
  await sleep(100)
  t.equal((await get(pool, '/healthz')).body, 'ok', 'the exempt route answers during the burst')
  const statuses = (await Promise.all(reports)).map((a) => a.statusCode)
  const pools = JSON.parse((await get(pool, '/pools')).body) as Array<{ name: string, peakInFlight: number, admitted: number, rejected: { queueFull: number, queueTimeout: number } }>
  const report = pools.find((p) => p.name === 'GET /report')
  t.match(report, { peakInFlight: 2, rejected: { queueFull: 2 } }, 'two at once; the queue holds ten')
  t.equal(statuses.filter((s) => s === 200).length, report?.admitted, 'every admitted request was served')
  t.equal(statuses.filter((s) => s === 503).length, 2 + (report?.rejected.queueTimeout ?? 0), 'the rest were refused')
  t.ok((report?.admitted ?? 0) >= 4, `about 4 a second were served (${report?.admitted ?? 0})`)
})
