/**
 * The hibernation state of every kernel of the server, kept current from the
 * server's event stream.
 *
 * Sources, newest wins: kernelhib's events (and jupyter_server's kernel
 * lifecycle events, after which the kernel's model is fetched again); the
 * answers to this front end's own requests; an initial `GET /api/kernels`.
 * JupyterLab's own refreshes of the kernel and session lists add and drop
 * kernels and name them after their notebooks. There is no polling here.
 */
import type { Kernel, ServiceManager, Session } from '@jupyterlab/services';
import type { ISignal } from '@lumino/signaling';
import { Signal } from '@lumino/signaling';
import {
  getKernel,
  hibernateKernel,
  listKernels,
  RequestError,
  wakeKernel,
  recomputeKernel
} from './api';
import type { IHibernationEvent, IKernelModel, IKernelView } from './state';
import {
  applyEvent,
  beginTransition,
  KERNEL_ACTIONS_SCHEMA,
  kernelLabel,
  mergeListing,
  parseHibernationEvent,
  viewFromModel
} from './state';

export class HibernationStore {
  constructor(private readonly _services: ServiceManager.IManager) {
    _services.events.stream.connect(this._onEmission, this);
    _services.kernels.runningChanged.connect(this._onKernelListing, this);
    _services.sessions.runningChanged.connect(this._onSessionListing, this);
    this._onSessionListing(_services.sessions, [
      ..._services.sessions.running()
    ]);
  }

  /** Emitted whenever any kernel's view or name changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** kernelhib's events, as they arrive (for notifications). */
  get events(): ISignal<this, IHibernationEvent> {
    return this._events;
  }

  get views(): IterableIterator<IKernelView> {
    return this._views.values();
  }

  view(kernelId: string): IKernelView | undefined {
    return this._views.get(kernelId);
  }

  /** The paths of the notebooks and consoles using a kernel. */
  paths(kernelId: string): string[] {
    return this._paths.get(kernelId) ?? [];
  }

  /** How the user knows a kernel: "the kernel of demo.ipynb". */
  label(kernelId: string): string {
    return kernelLabel(
      kernelId,
      this._views.get(kernelId)?.name ?? '',
      this.paths(kernelId)
    );
  }

  /** Fetch every kernel's model and the sessions (when the panel opens, and at start). */
  async refresh(): Promise<void> {
    const since = this._clock;
    const [models] = await Promise.all([
      listKernels(this._services.serverSettings),
      this._services.sessions.refreshRunning()
    ]);
    const views = new Map<string, IKernelView>();
    for (const model of models) {
      const known = this._views.get(model.id);
      // An event or answer about the kernel came in meanwhile: it is newer.
      views.set(
        model.id,
        known && this._newerThan(model.id, since) ? known : viewFromModel(model)
      );
    }
    for (const [id, view] of this._views) {
      if (!views.has(id) && this._newerThan(id, since)) {
        views.set(id, view);
      }
    }
    this._views = views;
    this._changed.emit();
  }

  /** Hibernate a kernel; a RequestError says why the server refused. */
  async hibernate(kernelId: string, force = false): Promise<void> {
    this._begin(kernelId, 'hibernating');
    await this._settle(kernelId, () =>
      hibernateKernel(this._services.serverSettings, kernelId, force)
    );
  }

  /** Wake a hibernated kernel; a RequestError says why it failed. */
  async wake(kernelId: string): Promise<void> {
    this._begin(kernelId, 'waking');
    await this._settle(kernelId, () =>
      wakeKernel(this._services.serverSettings, kernelId)
    );
  }

  /** Run the cells that re-create the kernel's lost variables; a RequestError says why not. */
  async recompute(kernelId: string): Promise<void> {
    await this._settle(kernelId, () =>
      recomputeKernel(this._services.serverSettings, kernelId)
    );
  }

  /** Shut a kernel down, discarding its image if it is hibernated. */
  async discard(kernelId: string): Promise<void> {
    await this._services.kernels.shutdown(kernelId);
    this._views.delete(kernelId);
    this._changed.emit();
  }

  /**
   * A cell was sent to the kernel: if it is hibernated, the server is waking it
   * (its `wake` event ends this).
   */
  expectWake(kernelId: string): void {
    if (this._views.get(kernelId)?.state === 'hibernated') {
      this._begin(kernelId, 'waking');
    }
  }

  private _begin(kernelId: string, state: 'hibernating' | 'waking'): void {
    const view = this._views.get(kernelId);
    if (view !== undefined) {
      this._set(beginTransition(view, state));
    }
  }

  /** Apply a request's answer, or on failure the kernel's model now; rethrow the failure. */
  private async _settle(
    kernelId: string,
    send: () => Promise<IKernelModel>
  ): Promise<void> {
    let model: IKernelModel;
    try {
      model = await send();
    } catch (error) {
      await this._refetch(kernelId).catch(() => undefined);
      throw error;
    }
    this._set(viewFromModel(model));
  }

  /** Fetch one kernel's model, unless an event or answer about it comes in meanwhile. */
  private async _refetch(kernelId: string): Promise<void> {
    const since = this._clock;
    let model: IKernelModel;
    try {
      model = await getKernel(this._services.serverSettings, kernelId);
    } catch (error) {
      if (error instanceof RequestError && error.status === 404) {
        if (this._views.delete(kernelId)) {
          this._changed.emit();
        }
        return;
      }
      throw error;
    }
    if (!this._newerThan(kernelId, since)) {
      this._set(viewFromModel(model));
    }
  }

  private _set(view: IKernelView): void {
    this._clock += 1;
    this._stamps.set(view.id, this._clock);
    this._views.set(view.id, view);
    this._changed.emit();
  }

  /** Whether the kernel's view changed after `since` (a reading of `_clock`). */
  private _newerThan(kernelId: string, since: number): boolean {
    return (this._stamps.get(kernelId) ?? 0) > since;
  }

  private _onEmission(
    _: unknown,
    emission: { readonly [key: string]: unknown }
  ): void {
    const event = parseHibernationEvent(emission);
    if (event !== null) {
      this._set(applyEvent(this._views.get(event.kernel_id), event));
      this._events.emit(event);
      // The event says all about hibernation; the model adds activity and connections.
      void this._refetch(event.kernel_id).catch(() => undefined);
      return;
    }
    const kernelId = emission.kernel_id;
    if (
      emission.schema_id === KERNEL_ACTIONS_SCHEMA &&
      typeof kernelId === 'string'
    ) {
      // Started, restarted (which discards an image), shut down...
      void this._refetch(kernelId).catch(() => undefined);
    }
  }

  private _onKernelListing(_: unknown, models: Kernel.IModel[]): void {
    this._views = mergeListing(this._views, models as IKernelModel[]);
    this._changed.emit();
  }

  private _onSessionListing(_: unknown, models: Session.IModel[]): void {
    const paths = new Map<string, string[]>();
    for (const session of models) {
      if (session.kernel) {
        const list = paths.get(session.kernel.id) ?? [];
        list.push(session.path);
        paths.set(session.kernel.id, list);
      }
    }
    this._paths = paths;
    this._changed.emit();
  }

  private _views = new Map<string, IKernelView>();
  private _paths = new Map<string, string[]>();
  /**
   * Counts view updates; `_stamps` holds each kernel's count at its last update,
   * so that a fetch answered after an event does not undo it.
   */
  private _clock = 0;
  private _stamps = new Map<string, number>();
  private readonly _changed = new Signal<this, void>(this);
  private readonly _events = new Signal<this, IHibernationEvent>(this);
}
