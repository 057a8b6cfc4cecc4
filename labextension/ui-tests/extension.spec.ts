/**
 * kernelhib's extension is loaded: a notebook's toolbar shows its hibernate button. The
 * quickest proof that an install carries the extension; scripts/test-install.sh runs it
 * against JupyterLab as the Quick Start sets it up on a machine without Node.js.
 */
import { expect, test } from '@playwright/test';

const URL = process.env.KERNELHIB_UI_URL!;
const TOKEN = process.env.KERNELHIB_UI_TOKEN!;

test("a notebook's toolbar shows kernelhib's hibernate button", async ({
  page
}) => {
  await page.goto(`${URL}/lab/tree/hibernate.ipynb?token=${TOKEN}`);
  const item = page.locator('.jp-NotebookPanel .jp-kernelhib-ToolbarItem');
  await expect(item).toBeVisible();
  // Any state: in scripts/test-ui.sh this runs after tests that hibernate this notebook's kernel.
  await expect(item).toHaveAttribute('data-kernelhib-state', /^[a-z]+$/);
  await expect(item.locator('button')).toBeVisible();
  await expect(item.locator('button')).toHaveAttribute('title', /kernel/i);
});
