/**
 * A real `bap-engine serve` for the tests: a free 127.0.0.1 port, a tmp ORCH_DATA_DIR (embedded
 * Postgres under it, unless ORCH_DATABASE_URL / ORCH_TEST_DATABASE_URL names one), the subprocess
 * backend with the reference engine. Stopped by PID (SIGTERM, then SIGKILL), and whatever it left
 * running under the tmp dir (engines, the embedded Postgres) is killed by PID before the dir is removed.
 *
 * The executable: BAP_ENGINE_EXE, else <repo>/.venv/bin/bap-engine.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

// compiled to <repo>/clients/typescript/dist/test/server.js
const REPO = fileURLToPath(new URL("../../../../", import.meta.url));

export interface LiveServer {
  url: string;
  adminKey: string;
  pid: number;
  dataDir: string;
  logTail(chars?: number): string;
  stop(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === "object" && addr ? resolve(addr.port) : reject(new Error("no port"))));
    });
  });
}

const delay = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** /proc/<pid>/stat field 22 (starttime), or undefined when there is no such process. */
function startTime(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[0] === "Z" ? undefined : Number(fields[19]);
  } catch {
    return undefined;
  }
}

/** Engines the server started under `dataDir/engines/` and left running: their recorded pid, if it is
 * still the same process (same /proc starttime). */
function leftoverEngines(dataDir: string): number[] {
  const root = join(dataDir, "engines");
  if (!existsSync(root)) return [];
  const pids: number[] = [];
  for (const entry of readdirSync(root)) {
    try {
      const rec = JSON.parse(readFileSync(join(root, entry, ".bap-process.json"), "utf8")) as {
        pid?: unknown; starttime?: unknown;
      };
      if (typeof rec.pid === "number" && startTime(rec.pid) !== undefined
          && (typeof rec.starttime !== "number" || startTime(rec.pid) === rec.starttime)) {
        pids.push(rec.pid);
      }
    } catch {
      // no record: nothing was started there
    }
  }
  return pids;
}

/** The embedded Postgres postmaster under `dataDir/pg`, if it still runs on that data dir. */
function leftoverPostgres(dataDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(dataDir, "pg", "postmaster.pid"), "utf8").split("\n")[0]);
    const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmd.includes(dataDir) && alive(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** The process is gone (a zombie counts as gone). */
function gone(pid: number): boolean {
  return existsSync("/proc/self") ? startTime(pid) === undefined : !alive(pid);
}

async function waitExit(pid: number, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (!gone(pid)) {
    if (Date.now() > end) return false;
    await delay(50);
  }
  return true;
}

async function terminate(pid: number, graceMs: number, group = false): Promise<void> {
  const sig = (s: NodeJS.Signals) => {
    try {
      process.kill(group ? -pid : pid, s);
    } catch {
      if (group) {
        try {
          process.kill(pid, s);
        } catch {
          // already gone
        }
      }
    }
  };
  sig("SIGTERM");
  if (!(await waitExit(pid, graceMs))) {
    sig("SIGKILL");
    await waitExit(pid, 5000);
  }
}

function fernetKey(): string {
  return randomBytes(32).toString("base64").replace(/\+/g, "-").replace(/\//g, "_");
}

export async function startServer(overrides: Record<string, string> = {}): Promise<LiveServer> {
  const exe = process.env.BAP_ENGINE_EXE ?? join(REPO, ".venv", "bin", "bap-engine");
  if (!existsSync(exe)) throw new Error(`bap-engine not found at ${exe} (set BAP_ENGINE_EXE or run make install)`);
  const dataDir = mkdtempSync(join(tmpdir(), "bap-ts-client-"));
  const port = await freePort();
  const adminKey = `adm-ts-${randomBytes(16).toString("hex")}`;
  const block = 10000 + 20 * Math.floor(Math.random() * 499); // engine ports: 10000–19999, below the Python suite's
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith("ORCH_")) env[k] = v;
  const dbUrl = process.env.ORCH_DATABASE_URL || process.env.ORCH_TEST_DATABASE_URL;
  Object.assign(env, {
    ORCH_DATA_DIR: dataDir,
    ORCH_ADMIN_KEY: adminKey,
    ORCH_HOST: "127.0.0.1",
    ORCH_PORT: String(port),
    ORCH_PORT_MIN: String(block),
    ORCH_PORT_MAX: String(block + 19),
    ORCH_DEPLOYMENT: `ts-${randomBytes(4).toString("hex")}`,
    ORCH_BOOT_TIMEOUT_S: "30",
    ORCH_STOP_GRACE_S: "5",
    ORCH_LOG_LEVEL: "INFO",
  });
  if (dbUrl) {
    env.ORCH_DATABASE_URL = dbUrl;
    env.ORCH_MASTER_KEY = process.env.ORCH_MASTER_KEY || fernetKey();
  }
  Object.assign(env, overrides);

  const logPath = join(dataDir, "serve.log");
  const fd = openSync(logPath, "w");
  let child: ChildProcess;
  try {
    child = spawn(exe, ["serve"], { env, stdio: ["ignore", fd, fd], cwd: dataDir });
  } finally {
    closeSync(fd);
  }
  const pid = child.pid;
  if (pid === undefined) throw new Error(`cannot spawn ${exe}`);
  let exited: number | null = null;
  child.on("exit", (code, signal) => {
    exited = code ?? (signal ? 128 : 1);
  });
  const logTail = (chars = 3000) => {
    try {
      return readFileSync(logPath, "utf8").slice(-chars);
    } catch {
      return "";
    }
  };

  let stopped = false;
  // the test process ending without stop() (an uncaught error, a signal): never leave the server behind
  const onExit = () => {
    if (exited === null) {
      try {
        process.kill(pid, "SIGTERM");
      } catch {
        // already gone
      }
    }
  };
  const onSignal = (signal: NodeJS.Signals) => {
    void stop().finally(() => process.kill(process.pid, signal));
  };
  process.once("exit", onExit);
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    if (exited === null) await terminate(pid, 15_000);
    for (const engine of leftoverEngines(dataDir)) await terminate(engine, 5000, true);
    const pg = leftoverPostgres(dataDir);
    if (pg !== undefined) await terminate(pg, 10_000);
    rmSync(dataDir, { recursive: true, force: true });
    process.off("exit", onExit);
  };

  const url = `http://127.0.0.1:${port}`;
  const end = Date.now() + 60_000;
  for (;;) {
    if (exited !== null) {
      const tail = logTail();
      await stop();
      throw new Error(`bap-engine serve exited with ${exited}:\n${tail}`);
    }
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
      if (res.status === 200) break;
      await res.body?.cancel();
    } catch {
      // not listening yet
    }
    if (Date.now() > end) {
      const tail = logTail();
      await stop();
      throw new Error(`bap-engine serve not ready within 60 s:\n${tail}`);
    }
    await delay(100);
  }
  return { url, adminKey, pid, dataDir, logTail, stop };
}
