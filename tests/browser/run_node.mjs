// Runs Python test scenarios for grpcbridge.browser inside Pyodide under Node.
//
//   node tests/browser/run_node.mjs [--bundle build/browser] [--scenarios FILE]
//        [--config JSON] [--websocket ws|native]
//
// Loads Pyodide from node_modules (npm ci), installs the wheels listed in
// <bundle>/manifest.json (scripts/build_browser_bundle.py), provides globalThis.WebSocket
// (the npm `ws` package unless --websocket=native and Node has one; both stay reachable as
// globalThis.WsWebSocket and globalThis.NativeWebSocket), then runs `await main()` of the
// scenario module and prints one JSON line {"results": ...}.
//
// Protocol on stdout (one JSON object per line): {"signal": NAME, "data": ...} asks the
// test driver to do something (close a bridge...); the driver answers with one line on
// stdin, which resolves the Python side's `await harness.signal(...)`. Python's own output
// goes to stderr.

import { readFileSync } from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");

function option(name, fallback) {
  const prefix = `--${name}=`;
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === `--${name}` && i + 1 < args.length) return args[i + 1];
    if (args[i].startsWith(prefix)) return args[i].slice(prefix.length);
  }
  return fallback;
}

const bundle = path.resolve(option("bundle", path.join(root, "build", "browser")));
const scenarios = path.resolve(option("scenarios", path.join(here, "scenarios.py")));
const config = option("config", "{}");
const websocketKind = option("websocket", "ws");

function emit(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

// Replies from the driver, one line each, handed to waiting signals in order.
const replies = [];
const waiting = [];
const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  const resolve = waiting.shift();
  if (resolve) resolve(line);
  else replies.push(line);
});

globalThis.grpcbridgeHarness = {
  config,
  signal(name, data) {
    emit({ signal: name, data: data ?? null });
    return new Promise((resolve) => {
      const line = replies.shift();
      if (line !== undefined) resolve(line);
      else waiting.push(resolve);
    });
  },
};

async function main() {
  const started = performance.now();
  // Both implementations, for scenarios that run under each: the npm `ws` package, and
  // Node's own spec-following (undici) WebSocket where present (Node >= 22, or Node 20
  // started with --experimental-websocket), which behaves like a browser's.
  const native = typeof globalThis.WebSocket === "function" ? globalThis.WebSocket : null;
  const { WebSocket: WsWebSocket } = await import("ws");
  globalThis.NativeWebSocket = native;
  globalThis.WsWebSocket = WsWebSocket;
  globalThis.WebSocket = websocketKind === "native" && native ? native : WsWebSocket;
  const pyodideDir = path.join(root, "node_modules", "pyodide");
  const { loadPyodide } = await import(pathToFileURL(path.join(pyodideDir, "pyodide.mjs")).href);
  const pyodide = await loadPyodide({
    indexURL: pyodideDir + path.sep,
    stdout: (line) => process.stderr.write(line + "\n"),
    stderr: (line) => process.stderr.write(line + "\n"),
  });
  const booted = performance.now();
  const manifest = JSON.parse(readFileSync(path.join(bundle, "manifest.json"), "utf8"));
  await pyodide.loadPackage(manifest.wheels.map((name) => path.join(bundle, name)), {
    messageCallback: () => {},
    errorCallback: (message) => process.stderr.write(message + "\n"),
  });
  const loaded = performance.now();
  pyodide.FS.writeFile("/home/pyodide/browser_scenarios.py", readFileSync(scenarios, "utf8"));
  const results = await pyodide.runPythonAsync(`
import sys
sys.path.insert(0, "/home/pyodide")
import browser_scenarios
await browser_scenarios.main()
`);
  emit({
    results: JSON.parse(results),
    timing: {
      boot_s: (booted - started) / 1000,
      wheels_s: (loaded - booted) / 1000,
      scenarios_s: (performance.now() - loaded) / 1000,
    },
    native_websocket: native !== null,
    node: process.version,
  });
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`harness failed: ${error && error.stack ? error.stack : error}\n`);
    process.exit(2);
  },
);
