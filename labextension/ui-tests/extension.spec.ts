/**
 * kernelhib's extension is loaded: a notebook's toolbar shows its hibernate button. The
 * quickest proof that an install carries the extension; scripts/test-install.sh runs it
 * against JupyterLab as the Quick Start sets it up on a machine without Node.js.
 */
import { expect, test } from '@playwright/test';

const URL = process.env.KERNELHIB_UI_URL!;
const TOKEN = process.env.KERNELHIB_UI_TOKEN!;

test("a notebook's toolbar shows kernelhib's hibernate button", async ({
  page,
  request
}) => {
  // A workspace of its own, so that the other tests' JupyterLab opens as if this had not run.
  await page.goto(
    `${URL}/lab/workspaces/extension-check/tree/hibernate.ipynb?token=${TOKEN}`
  );
  const item = page.locator('.jp-NotebookPanel .jp-kernelhib-ToolbarItem');
  await expect(item).toBeVisible();
  await expect(item).toHaveAttribute('data-kernelhib-state', 'running');
  const button = item.locator('button');
  await expect(button).toBeVisible();
  await expect(button).toHaveAttribute('title', /^Hibernate kernel: /);

  // Leave the server as it was: no session, no kernel.
  await page.close();
  const sessions = await request.get(`${URL}/api/sessions?token=${TOKEN}`);
  for (const session of await sessions.json()) {
    const deleted = await request.delete(
      `${URL}/api/sessions/${session.id}?token=${TOKEN}`
    );
    expect(deleted.ok()).toBe(true);
  }
});
