/**
 * Playwright's global setup: start `jupyter lab` with kernelhib on loopback,
 * with a token, in a temporary root holding the test notebook, with settings,
 * workspaces and images of its own; return the teardown that stops it.
 *
 * The tests find it through KERNELHIB_UI_URL and KERNELHIB_UI_TOKEN.
 * KERNELHIB_JUPYTER names the `jupyter` executable (default: the repository's .venv).
 */
import { spawn } from 'child_process';
import { randomBytes } from 'crypto';
import * as fs from 'fs';
import { createServer } from 'net';
import * as os from 'os';
import * as path from 'path';

/** The notebook the test runs: a variable that only the same process can still know. */
const NOTEBOOK = {
  cells: [
    {
      cell_type: 'code',
      execution_count: null,
      metadata: {},
      outputs: [],
      source: [
        'import random\n',
        'secret = random.randrange(10**8, 10**9)\n',
        'secret'
      ]
    },
    {
      cell_type: 'code',
      execution_count: null,
      metadata: {},
      outputs: [],
      source: ['print(f"secret is {secret}")']
    },
    {
      cell_type: 'code',
      execution_count: null,
      metadata: {},
      outputs: [],
      source: [
        '# What the %hibernate magic will do: open a comm to the front end.\n',
        'from comm import create_comm\n',
        'channel = create_comm(target_name="kernelhib", data={})\n',
        'channel.send({"hello": 1})\n',
        '"comm sent"'
      ]
    }
  ],
  metadata: {
    kernelspec: {
      display_name: 'Python 3 (ipykernel)',
      language: 'python',
      name: 'python3'
    }
  },
  nbformat: 4,
  nbformat_minor: 5
};

/** JupyterLab settings: no news or update prompts over the screenshots. */
const SETTINGS = {
  '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {
    checkForUpdates: false,
    fetchNews: 'false'
  }
};

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() =>
        typeof address === 'object' && address
          ? resolve(address.port)
          : reject(address)
      );
    });
  });
}

async function waitUntilUp(url: string, exited: () => boolean): Promise<void> {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    if (exited()) {
      throw new Error('jupyter lab exited at start');
    }
    try {
      if ((await fetch(url)).ok) {
        return;
      }
    } catch {
      // not listening yet
    }
    await new Promise(resolve => setTimeout(resolve, 250));
  }
  throw new Error(`jupyter lab did not answer ${url} in 90 s`);
}

export default async function startJupyterLab(): Promise<() => Promise<void>> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'kernelhib-ui-'));
  const root = path.join(tmp, 'notebooks');
  fs.mkdirSync(root);
  fs.writeFileSync(
    path.join(root, 'hibernate.ipynb'),
    JSON.stringify(NOTEBOOK, null, 1)
  );
  for (const [file, value] of Object.entries(SETTINGS)) {
    const target = path.join(tmp, 'settings', file);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, JSON.stringify(value));
  }

  const port = await freePort();
  const token = randomBytes(16).toString('hex');
  const jupyter =
    process.env.KERNELHIB_JUPYTER ??
    path.resolve(__dirname, '..', '..', '.venv', 'bin', 'jupyter');
  const args = [
    'lab',
    '--no-browser',
    '--ServerApp.ip=127.0.0.1',
    `--ServerApp.port=${port}`,
    '--ServerApp.port_retries=0',
    `--IdentityProvider.token=${token}`,
    `--ServerApp.root_dir=${root}`,
    `--KernelHibernator.image_dir=${path.join(tmp, 'images')}`,
    '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate'
  ];
  if (process.getuid?.() === 0) {
    args.push('--allow-root');
  }
  const logPath = path.join(__dirname, 'test-results', 'jupyter-server.log');
  fs.mkdirSync(path.dirname(logPath), { recursive: true });
  const log = fs.openSync(logPath, 'w');
  const server = spawn(jupyter, args, {
    env: {
      ...process.env,
      JUPYTER_CONFIG_DIR: path.join(tmp, 'config'),
      JUPYTER_RUNTIME_DIR: path.join(tmp, 'runtime'),
      JUPYTERLAB_SETTINGS_DIR: path.join(tmp, 'settings'),
      JUPYTERLAB_WORKSPACES_DIR: path.join(tmp, 'workspaces')
    },
    stdio: ['ignore', log, log]
  });
  let exited = false;
  server.once('exit', () => (exited = true));

  const url = `http://127.0.0.1:${port}`;
  try {
    await waitUntilUp(`${url}/api/status?token=${token}`, () => exited);
  } catch (error) {
    server.kill('SIGTERM');
    throw new Error(
      `${error}; see ${logPath}:\n${fs.readFileSync(logPath, 'utf-8')}`
    );
  }
  process.env.KERNELHIB_UI_URL = url;
  process.env.KERNELHIB_UI_TOKEN = token;

  return async () => {
    if (!exited) {
      const stopped = new Promise(resolve => server.once('exit', resolve));
      server.kill('SIGTERM');
      await stopped;
    }
    fs.closeSync(log);
    fs.rmSync(tmp, { recursive: true, force: true });
  };
}
