// bench/cachetests: counts one cache's results (the suite client's JSON) by the suite's own
// verdicts (test-engine/lib/results.mjs, dependencies honoured as on cache-tests.fyi).
//   node summary.mjs SUITE_DIR RESULTS.json   -> one JSON line {pass, fail, optional_fail, ...}
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const [suite, resultsPath] = process.argv.slice(2)
const load = p => import(pathToFileURL(path.join(suite, p)).href)
const tests = (await load('tests/index.mjs')).default
const { determineTestResult, resultTypes } = await load('test-engine/lib/results.mjs')
const results = JSON.parse(fs.readFileSync(resultsPath, 'utf8'))
const names = new Map(Object.entries(resultTypes).map(([k, v]) => [v, k]))
const counts = {}
const failed = {}
for (const s of tests) {
  for (const t of s.tests) {
    if (t.browser_only === true) continue // a shared cache, not a browser
    const kind = names.get(determineTestResult(tests, t.id, results)) || 'unknown'
    counts[kind] = (counts[kind] || 0) + 1
    if (!['pass', 'yes', 'no', 'untested'].includes(kind)) {
      const r = results[t.id]
      failed[t.id] = [kind, Array.isArray(r) ? String(r[1]).slice(0, 160) : String(r)]
    }
  }
}
console.log(JSON.stringify({ counts, failed }))
