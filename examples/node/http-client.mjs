// Read a root's graph through the graphcache sidecar's HTTP API (GET /v1/graphs/{root_id}).
//
//   node http-client.mjs BASE_URL ROOT_ID [--msgpack] [--min-version N] [--if-none-match ETAG]
//
// BASE_URL is the address the sidecar's ready line names (http://127.0.0.1:9464 by default). With
// GRAPHCACHE_API_TOKEN set, it is sent as the bearer token. Prints one JSON line:
//   200  {"status": 200, "root_id", "version", "etag", "nodes": {id: {"parent_id", "data", "row_version"}}}
//   304  {"status": 304, "root_id", "etag"}                  (If-None-Match matched the current version)
//   else {"status", "root_id", "title", "detail"}            (the problem+json body), exit 1
// An unreachable sidecar is one line on stderr, exit 1; bad arguments, exit 2.
//
// "version" and each "row_version" are 64-bit integers, printed exactly as decimal strings: JavaScript
// numbers lose precision above 2**53, so msgpack is decoded with BigInt for 64-bit integers, and in JSON
// mode an integer too long for a double is read as its decimal digits (in "data" such an integer prints
// as a string).
import { parseArgs } from "node:util";
import { Decoder } from "@msgpack/msgpack";

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      msgpack: { type: "boolean", default: false },
      "min-version": { type: "string" },
      "if-none-match": { type: "string" },
    },
  });
} catch (err) {
  usage(err.message);
}
const { values, positionals } = parsed;
if (positionals.length !== 2) usage("want BASE_URL and ROOT_ID");
const [baseUrl, rootId] = positionals;
const minVersion = values["min-version"];
if (minVersion !== undefined && !/^[0-9]{1,19}$/.test(minVersion)) {
  usage(`--min-version: want a whole number, got ${minVersion}`);
}

// The root id is one path segment: percent-encode it ("/" becomes %2F).
const url = new URL(`${baseUrl.replace(/\/+$/, "")}/v1/graphs/${encodeURIComponent(rootId)}`);
if (minVersion !== undefined) url.searchParams.set("min_version", minVersion);
const headers = { accept: values.msgpack ? "application/msgpack" : "application/json" };
if (values["if-none-match"] !== undefined) headers["if-none-match"] = values["if-none-match"];
if (process.env.GRAPHCACHE_API_TOKEN) headers.authorization = `Bearer ${process.env.GRAPHCACHE_API_TOKEN}`;

let response;
try {
  response = await fetch(url, { headers }); // Node's built-in fetch: no HTTP library needed
} catch (err) {
  fail(`${url.origin}: ${err.cause?.message ?? err.message}`);
}
const etag = response.headers.get("etag");
if (response.status === 304) {
  print({ status: 304, root_id: rootId, etag });
} else if (!response.ok) {
  const problem = await response.json().catch(() => ({}));
  print({ status: response.status, root_id: rootId, title: problem.title, detail: problem.detail });
  process.exitCode = 1;
} else {
  const graph = values.msgpack
    ? new Decoder({ useBigInt64: true }).decode(new Uint8Array(await response.arrayBuffer()))
    : parseJsonExactly(await response.text());
  const version = BigInt(graph.version).toString();
  if (etag !== `"${version}"`) fail(`the ETag ${etag} does not name the graph's version ${version}`);
  const nodes = {};
  for (const [id, node] of Object.entries(graph.nodes)) {
    const rowVersion = BigInt(node.row_version).toString();
    nodes[id] = { parent_id: node.parent_id, data: node.data, row_version: rowVersion };
  }
  print({ status: 200, root_id: graph.root_id, version, etag, nodes });
}

// JSON.parse, except that integers a double cannot hold exactly arrive as decimal strings (read the
// version and row versions with BigInt, which takes either). Only number tokens are touched: strings are
// matched first, so digits inside them are left alone, and a number token starts after ":", ",", "[" or
// whitespace and ends before ",", "]", "}" or whitespace (so no fraction or exponent is cut).
function parseJsonExactly(text) {
  const exact = text.replace(/"(?:[^"\\]|\\.)*"|(?<=[:,[\s])-?\d{16,}(?=[,\]}\s])/g, (token) =>
    token.startsWith('"') || Number.isSafeInteger(Number(token)) ? token : `"${token}"`,
  );
  return JSON.parse(exact);
}

// One JSON line. In "data", a BigInt (msgpack's 64-bit integers) prints as a number when a double holds
// it exactly and as a decimal string otherwise, as JSON mode reads it: both modes print the same.
function print(result) {
  const plain = (_key, value) => {
    if (typeof value !== "bigint") return value;
    return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  };
  console.log(JSON.stringify(result, plain));
}

function fail(reason) {
  console.error(reason);
  process.exit(1);
}

function usage(reason) {
  console.error(reason);
  console.error("usage: node http-client.mjs BASE_URL ROOT_ID [--msgpack] [--min-version N]"
    + " [--if-none-match ETAG]");
  process.exit(2);
}
