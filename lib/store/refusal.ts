import type { FastifyReply } from 'fastify'
import { StoreUnavailableError } from '../errors.js'

const { code, message, statusCode } = new StoreUnavailableError()
// Fastify's own error body, in its order, serialized once.
const BODY = JSON.stringify({ statusCode, code, error: 'Service Unavailable', message })
const JSON_TYPE = 'application/json; charset=utf-8'
// The store is asked again within a second of failing (see redis.ts).
const RETRY_AFTER = 1

/**
 * Answers a request of a shared pool whose store failed, with
 * `onStoreError: 'refuse'`: always 503, whatever `statusCode` says for a full
 * pool, since the failure is the server's and not the client's load.
 */
export function refuseUnavailable (reply: FastifyReply): void {
  reply.code(statusCode).header('retry-after', RETRY_AFTER).type(JSON_TYPE).send(BODY)
}
