// Boots the browser demo: Pyodide, then the wheels of build/browser, then the Python app
// grpcbridge.demo.web_app (inside the grpcbridge wheel), whose main() runs the Todo app.
//
// Where things are comes from /_demo/config.json, written by the demo server
// (grpcbridge.demo.web): {"pyodideUrl", "wheelsUrl", "manifest", "grpcPath"}. Code URLs are
// deliberately not taken from the query string (a crafted link could run someone else's
// script on this origin). `?app=none` boots everything but the app (benchmarks).
//
// window.grpcbridgeDemo exposes {pyodide, app, config, timings, ready} for tests and
// benchmarks; timings are milliseconds since navigation start.

const DEFAULT_CONFIG = {
  pyodideUrl: "/pyodide/",
  wheelsUrl: "/wheels/",
  manifest: "manifest.json",
  grpcPath: "/grpc",
};

// Files of the Pyodide runtime worth showing download progress for (the rest are small).
// loadPyodide fetches them; the loader only watches those requests (see startPyodide).
const RUNTIME_FILES = ["pyodide.asm.wasm", "python_stdlib.zip"];

const STEPS = [
  { id: "config", label: "Reading the configuration", weight: 2 },
  { id: "runtime", label: "Downloading Python (Pyodide)", weight: 45 },
  { id: "boot", label: "Starting Python", weight: 25 },
  { id: "wheels", label: "Installing grpcbridge, grpclib and protobuf", weight: 15 },
  { id: "import", label: "Importing the app and its gRPC stubs", weight: 8 },
  { id: "connect", label: "Connecting: gRPC over WebSocket", weight: 5 },
];

const $ = (id) => document.getElementById(id);
const demo = {
  pyodide: null,
  app: null,
  config: null,
  timings: {},
  error: null,
  ready: null,
};
window.grpcbridgeDemo = demo;

const progress = Object.fromEntries(STEPS.map((step) => [step.id, 0]));
let ticker = null;

function renderSteps() {
  const list = $("load-steps");
  for (const step of STEPS) {
    const item = document.createElement("li");
    item.dataset.step = step.id;
    item.dataset.state = "pending";
    item.dataset.testid = `step-${step.id}`;
    const label = document.createElement("span");
    label.textContent = step.label;
    const detail = document.createElement("span");
    detail.className = "detail";
    item.append(label, detail);
    list.append(item);
  }
}

function stepItem(id) {
  return document.querySelector(`#load-steps li[data-step="${id}"]`);
}

function setStep(id, state, detail) {
  const item = stepItem(id);
  if (!item) return;
  item.dataset.state = state;
  if (detail !== undefined) item.querySelector(".detail").textContent = detail;
  if (state === "done") setProgress(id, 1);
}

function setProgress(id, fraction) {
  progress[id] = Math.max(progress[id], Math.min(1, Math.max(0, fraction)));
  const total = STEPS.reduce((sum, step) => sum + step.weight, 0);
  const done = STEPS.reduce((sum, step) => sum + step.weight * progress[step.id], 0);
  const percent = Math.floor((100 * done) / total);
  $("load-bar").style.width = `${percent}%`;
  $("load-percent").textContent = `${percent}%`;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function setStatus(state, text, detail = "") {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
  $("status-detail").textContent = detail;
}

async function timed(id, work) {
  const started = performance.now();
  setStep(id, "active");
  const result = await work();
  const elapsed = performance.now() - started;
  demo.timings[id] = elapsed;
  const item = stepItem(id);
  const detail = item ? item.querySelector(".detail").textContent : "";
  setStep(id, "done", detail ? `${detail} · ${seconds(elapsed)}` : seconds(elapsed));
  return result;
}

async function fetchOk(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`cannot fetch ${url}: ${error.message} (is the demo server running?)`);
  }
  if (!response.ok) {
    throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  }
  return response;
}

async function readConfig() {
  let config = { ...DEFAULT_CONFIG };
  try {
    const response = await fetch("/_demo/config.json", { cache: "no-store" });
    if (response.ok) config = { ...config, ...(await response.json()) };
  } catch (error) {
    console.warn("grpcbridge demo: no /_demo/config.json, using defaults", error);
  }
  const base = window.location.href;
  config.pyodideUrl = new URL(config.pyodideUrl, base).href.replace(/\/?$/, "/");
  config.wheelsUrl = new URL(config.wheelsUrl, base).href.replace(/\/?$/, "/");
  const query = new URLSearchParams(window.location.search);
  config.app = query.get("app") !== "none";
  return config;
}

// Start loadPyodide and show the download of the big runtime files. Pyodide makes the only
// request for each file (the HTTP cache answers it when it can: the runtime is served with a
// long max-age, and nothing probes the cache, so nothing is downloaded twice and the console
// stays clean). The loader wraps window.fetch while Pyodide starts: for a runtime file it
// reads a clone of the response to count the bytes, and Pyodide gets the original (the wasm
// is compiled while it streams, and the browser can cache the compiled code).
// Returns {downloaded, pyodide}: downloaded settles when those files are in (or Pyodide gave
// up), pyodide is loadPyodide's promise.
function startPyodide(config) {
  const detail = stepItem("runtime").querySelector(".detail");
  const pending = new Set(RUNTIME_FILES.map((name) => config.pyodideUrl + name));
  const watched = [];
  const loaded = new Map();
  let expected = 0;
  let finish;
  const downloaded = new Promise((resolve) => { finish = resolve; });
  const show = () => {
    const got = [...loaded.values()].reduce((a, b) => a + b, 0);
    const total = Math.max(expected, got, 1);
    detail.textContent = `${mib(got)} of ${mib(total)}`;
    setProgress("runtime", got / total);
  };
  const settle = (url) => {
    pending.delete(url);
    if (pending.size) return;
    // Resource timing says whether the bytes came over the network (transferSize 0: cache).
    const cachedOnly = watched.length > 0 && watched.every((name) => performance
      .getEntriesByName(name).some((entry) => entry.transferSize === 0 && entry.decodedBodySize));
    if (cachedOnly) detail.textContent = "in the browser cache";
    finish();
  };
  const watch = (url, response) => {
    watched.push(url);
    expected += Number(response.headers.get("Content-Length") || 0);
    loaded.set(url, 0);
    const reader = response.clone().body.getReader();
    (async () => {
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          loaded.set(url, loaded.get(url) + value.byteLength);
          show();
        }
      } catch {
        // Pyodide reads the same response and reports the failure.
      } finally {
        show();
        settle(url);
      }
    })();
  };
  const originalFetch = window.fetch;
  window.fetch = async function (resource, options) {
    const response = await originalFetch.call(this, resource, options);
    const url = new URL(resource instanceof Request ? resource.url : resource,
      window.location.href).href;
    if (pending.has(url) && !watched.includes(url) && response.ok && response.body) {
      watch(url, response);
    }
    return response;
  };
  const pyodide = (async () => {
    try {
      const { loadPyodide } = await import(config.pyodideUrl + "pyodide.mjs");
      return await loadPyodide({
        indexURL: config.pyodideUrl,
        stdout: (line) => console.log(`[python] ${line}`),
        stderr: (line) => console.warn(`[python] ${line}`),
      });
    } finally {
      window.fetch = originalFetch;
      finish(); // a file Pyodide did not fetch (or that failed) holds up nothing
    }
  })();
  pyodide.catch(() => {}); // handled by the "boot" step, which awaits it
  return { downloaded, pyodide };
}

// Fetch build/browser's manifest and wheels (in parallel with booting Python).
async function fetchWheels(config) {
  const manifestUrl = config.wheelsUrl + config.manifest;
  let manifest;
  try {
    manifest = await (await fetchOk(manifestUrl, { cache: "no-cache" })).json();
  } catch (error) {
    throw new Error(`${error.message}\nBuild the wheels: python scripts/build_browser_bundle.py`);
  }
  const detail = stepItem("wheels").querySelector(".detail");
  let count = 0;
  const wheels = await Promise.all(manifest.wheels.map(async (name) => {
    const response = await fetchOk(config.wheelsUrl + name, { cache: "no-cache" });
    const bytes = new Uint8Array(await response.arrayBuffer());
    count += 1;
    detail.textContent = `downloaded ${count} of ${manifest.wheels.length}`;
    return { name, bytes };
  }));
  return { manifest, wheels };
}

async function bootPython(loading) {
  const detail = stepItem("boot").querySelector(".detail");
  const started = performance.now();
  // Emscripten gives no progress while it compiles and starts: show the time instead.
  const clock = setInterval(() => {
    const elapsed = performance.now() - started;
    detail.textContent = seconds(elapsed);
    setProgress("boot", 1 - Math.exp(-elapsed / 1500));
  }, 100);
  try {
    const pyodide = await loading.pyodide;
    detail.textContent = `Python ${pyodide.version ? `(Pyodide ${pyodide.version})` : ""}`;
    return pyodide;
  } finally {
    clearInterval(clock);
  }
}

// Install the wheels into site-packages. unpackArchive is what loadPackage does for a pure
// wheel, minus its lock-file bookkeeping (3-4x faster here), and the downloads overlapped
// the boot.
async function installWheels(pyodide, download) {
  const { wheels } = await download;
  const detail = stepItem("wheels").querySelector(".detail");
  wheels.forEach(({ name, bytes }, index) => {
    try {
      pyodide.unpackArchive(bytes, "wheel");
    } catch (error) {
      throw new Error(`cannot install ${name}: ${error.message}`);
    }
    detail.textContent = `${index + 1} of ${wheels.length}`;
    setProgress("wheels", (index + 1) / wheels.length);
  });
  const missing = pyodide.runPython(`
import importlib, importlib.util
importlib.invalidate_caches()
",".join(name for name in ("grpcbridge", "grpclib", "google.protobuf")
         if importlib.util.find_spec(name) is None)
`);
  if (missing) throw new Error(`the wheels did not provide ${missing}`);
  const kib = wheels.reduce((sum, { bytes }) => sum + bytes.byteLength, 0) / 1024;
  detail.textContent = `${wheels.length} wheels, ${kib.toFixed(0)} KiB`;
}

async function importApp(pyodide, config) {
  if (!config.app) {
    pyodide.runPython("import grpcbridge.browser, grpcbridge.demo.todo_grpc");
    return null;
  }
  try {
    return pyodide.pyimport("grpcbridge.demo.web_app");
  } catch (error) {
    throw new Error(`${error.message}\nIs build/browser older than the sources? ` +
      "Rebuild it: python scripts/build_browser_bundle.py");
  }
}

async function startApp(app, config) {
  if (!app) {
    setStatus("connected", "ready", "no app (?app=none)");
    return true;
  }
  const detail = stepItem("connect").querySelector(".detail");
  detail.textContent = new URL(config.grpcPath, window.location.href).href.replace(/^http/, "ws");
  const result = await app.main(JSON.stringify({ grpcPath: config.grpcPath }));
  const outcome = JSON.parse(result);
  if (!outcome.connected) detail.textContent = `not yet: ${outcome.reason}`;
  return outcome.connected;
}

function showError(error) {
  const message = error && error.message ? error.message : String(error);
  demo.error = message;
  console.error("grpcbridge demo failed to start:", error);
  const failed = error && error.step ? stepItem(error.step)
    : document.querySelector('#load-steps li[data-state="active"]');
  if (failed) failed.dataset.state = "error";
  $("load-error").hidden = false;
  $("load-error-text").textContent = message;
  setStatus("error", "failed", "see the error below");
  if (ticker !== null) clearInterval(ticker);
}

async function boot() {
  renderSteps();
  const started = performance.now();
  ticker = setInterval(() => {
    $("load-elapsed").textContent = seconds(performance.now() - started);
  }, 100);
  setStatus("loading", "loading", "starting Python in the page");
  const config = await timed("config", readConfig);
  demo.config = config;
  // The wheels download while Python boots; a missing bundle fails the page at once.
  const download = fetchWheels(config).catch((error) => {
    error.step = "wheels";
    throw error;
  });
  const python = (async () => {
    const loading = startPyodide(config);
    await timed("runtime", () => loading.downloaded);
    return timed("boot", () => bootPython(loading));
  })();
  const [pyodide] = await Promise.all([python, download]);
  demo.pyodide = pyodide;
  await timed("wheels", () => installWheels(pyodide, download));
  const app = await timed("import", () => importApp(pyodide, config));
  demo.app = app;
  const connected = await timed("connect", () => startApp(app, config));
  clearInterval(ticker);
  ticker = null;
  const total = performance.now();
  $("load-elapsed").textContent = seconds(total - started);
  if (connected) {
    // Ready: Python booted, app and stubs imported, the first RPC answered.
    demo.timings.ready = total;
    document.body.dataset.readyMs = String(Math.round(total));
    $("ready-time").textContent = `page ready in ${seconds(total)}`;
  } else {
    // The app keeps reconnecting (see the status); the page itself is loaded.
    $("ready-time").textContent = `page loaded in ${seconds(total)}`;
  }
  setTimeout(() => { $("loader").hidden = true; }, 400);
}

// Anything that goes wrong later (a bug in a handler) is shown too, not only logged.
function showLateError(error) {
  const message = error && error.message ? error.message : String(error);
  console.error("grpcbridge demo:", error);
  if ($("app").hidden) {
    $("load-error").hidden = false;
    $("load-error-text").textContent = message;
    return;
  }
  const box = $("app-error");
  box.textContent = `Unexpected error: ${message.split("\n").slice(-2).join(" ")}`;
  box.hidden = false;
}
window.addEventListener("unhandledrejection", (event) => showLateError(event.reason));
window.addEventListener("error", (event) => showLateError(event.error || event.message));

demo.ready = boot().then(() => true, (error) => {
  showError(error);
  return false;
});
