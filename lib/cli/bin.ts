#!/usr/bin/env node
// npx fastify-concurrency-limit tune <url>: see main.ts.
import { run } from './main.js'

await run()
