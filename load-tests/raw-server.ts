// The floor of a rejection: a bare node:http server answering a fixed 503.
// Same IPC protocol as server.ts.
import { createServer } from 'node:http'

const body = '{"statusCode":503,"code":"FST_CONCURRENCY_LIMIT_QUEUE_FULL","error":"Service Unavailable","message":"Too many requests in flight and the queue is full, retry later"}'
const headers = { 'content-type': 'application/json; charset=utf-8', 'content-length': String(Buffer.byteLength(body)), 'retry-after': '1' }
let requests = 0
let cpuMark = process.cpuUsage()

const server = createServer((_req, res) => {
  requests++
  res.writeHead(503, headers)
  res.end(body)
})

process.on('message', (message: { type: string }) => {
  if (message.type === 'reset') {
    requests = 0
    cpuMark = process.cpuUsage()
    process.send?.({ type: 'reset' })
  }
  if (message.type === 'stats') {
    const cpu = process.cpuUsage(cpuMark)
    process.send?.({ type: 'stats', stats: { requests, peakInFlight: 0, rssPeakMB: 0, rssMB: process.memoryUsage.rss() / 2 ** 20, eventLoopDelayP99Ms: 0, cpuMicros: cpu.user + cpu.system, threadsPeak: 0, plugin: null, okLatency: { count: 0, p50: 0, p99: 0, max: 0 } } })
  }
})
process.on('disconnect', () => { process.exit(0) })
server.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => {
  const address = server.address()
  process.send?.({ type: 'ready', port: typeof address === 'object' && address !== null ? address.port : 0 })
})
