/**
 * What the toolbar button, the commands and the panel do: requests to the
 * store, and notifications for refusals. Results and failures of the
 * hibernation itself are notified from the server's events (notifications.ts),
 * so that every open JupyterLab sees them, once.
 */
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { RequestError } from './api';
import { isIdle, refusalNotice } from './state';
import type { HibernationStore } from './store';

export class HibernationActions {
  constructor(private readonly _store: HibernationStore) {}

  async hibernate(kernelId: string, force = false): Promise<void> {
    try {
      await this._store.hibernate(kernelId, force);
    } catch (error) {
      this._refused('hibernate', kernelId, error);
    }
  }

  async wake(kernelId: string): Promise<void> {
    try {
      await this._store.wake(kernelId);
    } catch (error) {
      this._refused('wake', kernelId, error);
    }
  }

  /** Run the cells that re-create the variables the kernel's last wake lost. */
  async recompute(kernelId: string): Promise<void> {
    try {
      await this._store.recompute(kernelId);
    } catch (error) {
      this._refused('recompute', kernelId, error);
    }
  }

  /** Hibernate every running, idle kernel, one after the other. */
  async hibernateIdle(): Promise<void> {
    try {
      await this._store.refresh(); // execution states change without events
    } catch (error) {
      Notification.error(`Could not list the kernels: ${error}`);
      return;
    }
    const idle = [...this._store.views].filter(isIdle);
    if (idle.length === 0) {
      Notification.info('No idle kernel to hibernate.', { autoClose: 4000 });
      return;
    }
    for (const view of idle) {
      await this.hibernate(view.id);
    }
  }

  /** Shut a kernel down after the user confirms; a hibernated one loses its image. */
  async discard(kernelId: string): Promise<void> {
    const label = this._store.label(kernelId);
    const hibernated = this._store.view(kernelId)?.state === 'hibernated';
    const result = await showDialog({
      title: 'Discard kernel',
      body:
        `Shut down ${label}? Its variables are lost` +
        (hibernated ? ', and its hibernation image is deleted.' : '.'),
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Discard' })]
    });
    if (!result.button.accept) {
      return;
    }
    try {
      await this._store.discard(kernelId);
    } catch (error) {
      Notification.error(`Could not shut down ${label}: ${error}`);
    }
  }

  private _refused(
    action: 'hibernate' | 'wake' | 'recompute',
    kernelId: string,
    error: unknown
  ): void {
    const status = error instanceof RequestError ? error.status : 0;
    const reason = error instanceof RequestError ? error.reason : '';
    const message = error instanceof Error ? error.message : String(error);
    const notice = refusalNotice(
      action,
      this._store.label(kernelId),
      status,
      reason,
      message
    );
    if (notice === null) {
      return;
    }
    Notification.emit(notice.message, notice.type, {
      autoClose: notice.offerForce ? false : 8000,
      actions: notice.offerForce
        ? [
            {
              label: 'Hibernate anyway',
              displayType: 'warn',
              callback: () => void this.hibernate(kernelId, true)
            }
          ]
        : []
    });
  }
}
