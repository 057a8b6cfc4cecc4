/**
 * The UI state of kernel hibernation, as pure functions of the server's
 * kernel models and kernelhib's events, and the words the toolbar button,
 * status bar, panel and notifications show for it.
 *
 * Nothing here touches JupyterLab, the DOM or the network: jest tests it in Node.
 */

/** kernelhib's event schema (kernelhib/events/hibernation.yaml). */
export const HIBERNATION_SCHEMA = 'https://kernelhib.org/events/hibernation/v1';

/**
 * The id kernelhib 0.1 servers emit the same events under (in Jupyter's own
 * namespace): still read, for one release, so that this extension works with them.
 */
export const HIBERNATION_SCHEMA_0_1 =
  'https://events.jupyter.org/kernelhib/hibernation/v1';

/** jupyter_server's kernel lifecycle events (start, interrupt, shutdown, restart). */
export const KERNEL_ACTIONS_SCHEMA =
  'https://events.jupyter.org/jupyter_server/kernel_actions/v1';

export type HibernationState =
  'running' | 'hibernating' | 'hibernated' | 'waking';

const STATES: readonly string[] = [
  'running',
  'hibernating',
  'hibernated',
  'waking'
];

/** A variable a snapshot engine could not save (`hibernation.lost`). */
export interface ILostVariable {
  name: string;
  type: string;
  reason: string;
}

/** One cell of a recompute plan: a history entry (`In[number]`) and where it came from. */
export interface IRecomputeCell {
  number: number;
  source: string;
  /** When it last ran, in seconds since the epoch; null if the server did not see it run. */
  last_run: number | null;
  /** Its index among the notebook's cells; null if no cell matched. */
  notebook_cell: number | null;
  /** Why it must not be replayed (it writes files, runs shell commands...). */
  refused?: string;
}

/** How one lost variable comes back: the cells that re-create it, or why they may not run. */
export interface IRecomputeName {
  name: string;
  cells: number[];
  refused?: string;
}

/** `hibernation.recompute`: the plan for the variables a dill hibernation or wake lost. */
export interface IRecomputePlan {
  names: IRecomputeName[];
  cells: IRecomputeCell[];
  /** The cells one action runs, in order; empty once run, or if none may run. */
  run: number[];
  notebook?: { path: string; fingerprint: string; changed?: boolean };
  /** The names a run brought back. */
  recomputed?: string[];
  /** The cell that raised, which stopped the run. */
  failed?: { cell: number; error: string };
}

/** The `hibernation` object of a kernel's REST model; absent while a kernel simply runs. */
export interface IHibernationModel {
  state: HibernationState;
  engine?: string;
  image_bytes?: number;
  freed_bytes?: number;
  /** GPU memory the kernel held (a CUDA kernel hibernated with dill); absent if none. */
  gpu_freed_bytes?: number;
  seconds?: number;
  hibernated_at?: number;
  error?: string;
  lost?: ILostVariable[];
  /** Why CRIU was not used (at hibernation), or could not restore (at wake). */
  fallback_reason?: string;
  /** The plan for what dill lost (KernelHibernator.recompute 'offer' or 'auto'). */
  recompute?: IRecomputePlan;
}

/** A kernel model of `GET /api/kernels`, with kernelhib's additions. */
export interface IKernelModel {
  id: string;
  name: string;
  last_activity?: string;
  execution_state?: string;
  connections?: number;
  /** Private resident memory of the kernel's process tree; absent while hibernated. */
  memory_bytes?: number;
  hibernation?: IHibernationModel;
}

/**
 * One event of kernelhib's schema. Its action is one of eight:
 *
 * - `hibernate-started` (state hibernating), then `hibernate` (hibernated) or
 *   `hibernate-failed` (running, with `error`);
 * - `wake-started` (waking), then `wake` (running) or `wake-failed` (hibernated,
 *   with `error`);
 * - `recompute` or `recompute-failed` (running): the cells that re-create
 *   lost variables ran, or one raised (its `recompute.failed`).
 *
 * The -started events reach every client, not only the one that asked, so all
 * of them show the transition. Its state is the kernel's state after it; an
 * action added later changes the views by that state, without a notification.
 */
export interface IHibernationEvent extends IHibernationModel {
  action: string;
  kernel_id: string;
  /** `error` on the -failed actions; absent from kernelhib 0.1 servers. */
  status?: 'success' | 'error';
  /** The failure's code, as the `reason` of the REST answer (`no-space`...). */
  reason?: string;
}

/** What the UI knows about one kernel. */
export interface IKernelView {
  readonly id: string;
  /** The kernel spec name, e.g. `python3`. */
  readonly name: string;
  /** The server's execution state: idle, busy, starting, hibernated... */
  readonly executionState: string;
  /** ISO 8601 time of the kernel's last activity; '' if unknown. */
  readonly lastActivity: string;
  readonly connections: number;
  /** Memory the kernel's processes use now (what hibernating it would free); null if not reported. */
  readonly memoryBytes: number | null;
  readonly state: HibernationState;
  /** The engine of the last hibernation; '' if none. */
  readonly engine: string;
  readonly imageBytes: number;
  readonly freedBytes: number;
  /** GPU memory the last hibernation gave back; 0 if the kernel held none. */
  readonly gpuFreedBytes: number;
  /** How long the last hibernation or wake took. */
  readonly seconds: number;
  /** When the kernel was hibernated, in seconds since the epoch; 0 if never. */
  readonly hibernatedAt: number;
  /** Why the last hibernation or wake failed; '' if it did not. */
  readonly error: string;
  /** Why CRIU was not used, or could not restore; '' if it was (or no hibernation). */
  readonly fallbackReason: string;
  /** The variables the dill engine could not keep. */
  readonly lost: readonly ILostVariable[];
  /** The plan to recompute them; null if none. */
  readonly recompute: IRecomputePlan | null;
}

/** A kernel's view from its REST model. */
export function viewFromModel(model: IKernelModel): IKernelView {
  const hibernation = model.hibernation;
  return {
    id: model.id,
    name: model.name,
    executionState: model.execution_state ?? '',
    lastActivity: model.last_activity ?? '',
    connections: model.connections ?? 0,
    memoryBytes: model.memory_bytes ?? null,
    state: hibernation?.state ?? 'running',
    engine: hibernation?.engine ?? '',
    imageBytes: hibernation?.image_bytes ?? 0,
    freedBytes: hibernation?.freed_bytes ?? 0,
    gpuFreedBytes: hibernation?.gpu_freed_bytes ?? 0,
    seconds: hibernation?.seconds ?? 0,
    hibernatedAt: hibernation?.hibernated_at ?? 0,
    error: hibernation?.error ?? '',
    fallbackReason: hibernation?.fallback_reason ?? '',
    lost: hibernation?.lost ?? [],
    recompute: hibernation?.recompute ?? null
  };
}

/**
 * Merge a kernel listing (JupyterLab's own refresh of `GET /api/kernels`) into
 * the views: kernels that are gone are dropped and new ones added, but the
 * hibernation state of known kernels stays as events and requests left it,
 * since a listing may have been answered before the latest event.
 */
export function mergeListing(
  views: ReadonlyMap<string, IKernelView>,
  models: readonly IKernelModel[]
): Map<string, IKernelView> {
  const merged = new Map<string, IKernelView>();
  for (const model of models) {
    const known = views.get(model.id);
    const fresh = viewFromModel(model);
    merged.set(
      model.id,
      known === undefined
        ? fresh
        : {
            ...known,
            name: fresh.name,
            lastActivity: fresh.lastActivity || known.lastActivity,
            connections: fresh.connections,
            executionState: fresh.executionState || known.executionState,
            // A listing answered before the kernel hibernated may still have its memory.
            memoryBytes:
              known.state === 'hibernated'
                ? null
                : (fresh.memoryBytes ?? known.memoryBytes)
          }
    );
  }
  return merged;
}

/** A kernelhib event from the server's event stream; null for anything else. */
export function parseHibernationEvent(emission: {
  readonly [key: string]: unknown;
}): IHibernationEvent | null {
  const { schema_id, action, kernel_id, state } = emission;
  if (
    (schema_id !== HIBERNATION_SCHEMA &&
      schema_id !== HIBERNATION_SCHEMA_0_1) ||
    typeof action !== 'string' ||
    typeof kernel_id !== 'string' ||
    typeof state !== 'string' ||
    !STATES.includes(state)
  ) {
    return null;
  }
  return emission as unknown as IHibernationEvent;
}

/** The view of a kernel after an event about it (`view` undefined: a kernel not seen yet). */
export function applyEvent(
  view: IKernelView | undefined,
  event: IHibernationEvent
): IKernelView {
  const base = view ?? viewFromModel({ id: event.kernel_id, name: '' });
  switch (event.action) {
    case 'hibernate-started':
      // A new hibernation: nothing of an earlier one applies to it.
      return {
        ...base,
        state: 'hibernating',
        error: '',
        fallbackReason: '',
        lost: [],
        recompute: null
      };
    case 'wake-started':
      // The image's facts stay in sight while it is restored.
      return { ...base, state: 'waking', error: '' };
  }
  const hibernated = event.state === 'hibernated';
  return {
    ...base,
    state: event.state,
    executionState: hibernated
      ? 'hibernated'
      : event.action === 'wake'
        ? 'idle'
        : base.executionState,
    // Hibernated: no process. Woken: a new one, measured by the next fetch.
    memoryBytes:
      hibernated || event.action === 'wake' ? null : base.memoryBytes,
    engine: event.engine ?? base.engine,
    imageBytes: event.image_bytes ?? base.imageBytes,
    freedBytes: event.freed_bytes ?? base.freedBytes,
    // Sent only where the kernel held GPU memory: a new hibernation without it held none.
    gpuFreedBytes:
      event.gpu_freed_bytes ??
      (event.action === 'hibernate' ? 0 : base.gpuFreedBytes),
    seconds: event.seconds ?? base.seconds,
    hibernatedAt: event.hibernated_at ?? base.hibernatedAt,
    error: event.error ?? '',
    fallbackReason: event.fallback_reason ?? base.fallbackReason,
    lost: event.lost ?? base.lost,
    recompute: event.recompute ?? base.recompute
  };
}

/** The view while a request this front end made is under way. */
export function beginTransition(
  view: IKernelView,
  state: 'hibernating' | 'waking'
): IKernelView {
  return { ...view, state, error: '' };
}

/** Running and idle: what "Hibernate All Idle Kernels" hibernates. */
export function isIdle(view: IKernelView): boolean {
  return view.state === 'running' && view.executionState === 'idle';
}

/** The memory in use by all running kernels that report it. */
export function totalInUse(views: Iterable<IKernelView>): number {
  let total = 0;
  for (const view of views) {
    if (view.state === 'running') {
      total += view.memoryBytes ?? 0;
    }
  }
  return total;
}

/** The memory freed by all hibernated kernels. */
export function totalFreed(views: Iterable<IKernelView>): number {
  let total = 0;
  for (const view of views) {
    if (view.state === 'hibernated') {
      total += view.freedBytes;
    }
  }
  return total;
}

/** The panel's summary line: `Memory freed: 321.0 MiB, by 1 of 2 kernels; in use: 80.2 MiB` */
export function summaryText(views: readonly IKernelView[]): string {
  const hibernated = views.filter(v => v.state === 'hibernated').length;
  const measured = views.some(
    v => v.state === 'running' && v.memoryBytes !== null
  );
  return (
    `Memory freed: ${formatBytes(totalFreed(views))}, ` +
    `by ${hibernated} of ${views.length} kernel${views.length === 1 ? '' : 's'}` +
    (measured ? `; in use: ${formatBytes(totalInUse(views))}` : '')
  );
}

/** `1536` -> `1.5 KiB`, as kernelhib's CLI writes sizes. */
export function formatBytes(count: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = count;
  for (const unit of units) {
    if (Math.abs(value) < 1024) {
      return unit === 'B'
        ? `${Math.round(value)} B`
        : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

/** `0.592` -> `0.6 s`; `75` -> `1 min 15 s`. */
export function formatSeconds(seconds: number): string {
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

/** What the notebook toolbar button shows and does for a kernel. */
export interface IButtonLook {
  /** Which icon: the action offered while running, else the state. */
  icon: 'hibernate' | 'hibernating' | 'hibernated' | 'waking';
  /** Text beside the icon: empty while the kernel runs. */
  label: string;
  tooltip: string;
  /** What a click does; null while a transition is under way or there is no kernel. */
  action: 'hibernate' | 'wake' | null;
}

/** The toolbar button for a notebook's kernel; `view` undefined: no kernel yet. */
export function buttonLook(view: IKernelView | undefined): IButtonLook {
  if (view === undefined) {
    return {
      icon: 'hibernate',
      label: '',
      tooltip: 'Hibernate kernel (no kernel yet)',
      action: null
    };
  }
  switch (view.state) {
    case 'running':
      return {
        icon: 'hibernate',
        label: '',
        tooltip:
          'Hibernate kernel: save it to disk and free its memory' +
          (view.memoryBytes !== null
            ? ` (${formatBytes(view.memoryBytes)} in use)`
            : '') +
          (view.error ? `\nThe last attempt failed: ${view.error}` : ''),
        action: 'hibernate'
      };
    case 'hibernating':
      return {
        icon: 'hibernating',
        label: 'Hibernating…',
        tooltip: 'Hibernating the kernel…',
        action: null
      };
    case 'hibernated':
      return {
        icon: 'hibernated',
        label: 'Hibernated',
        tooltip:
          `${hibernatedSummary(view)}\n` +
          hibernationNotes(view)
            .map(note => `${note}\n`)
            .join('') +
          (view.error
            ? `The last wake failed: ${view.error}\nClick to try again.`
            : 'Click to wake it, or run a cell.'),
        action: 'wake'
      };
    case 'waking':
      return {
        icon: 'waking',
        label: 'Waking…',
        tooltip: 'Waking the kernel…',
        action: null
      };
  }
}

/** `321.1 MiB memory`, and ` and 3.6 GiB GPU memory` where the kernel held some. */
export function freedMemory(freedBytes: number, gpuFreedBytes = 0): string {
  const gpu =
    gpuFreedBytes > 0 ? ` and ${formatBytes(gpuFreedBytes)} GPU memory` : '';
  return `${formatBytes(freedBytes)} memory${gpu}`;
}

/** The same, short: `321.1 MiB`, or `321.1 MiB + 3.6 GiB GPU`. */
export function freedShort(view: IKernelView): string {
  const gpu =
    view.gpuFreedBytes > 0 ? ` + ${formatBytes(view.gpuFreedBytes)} GPU` : '';
  return `${formatBytes(view.freedBytes)}${gpu}`;
}

/** `Kernel hibernated (criu): 321.1 MiB memory freed, image 298.0 MiB` */
export function hibernatedSummary(view: IKernelView): string {
  const engine = view.engine ? ` (${view.engine})` : '';
  return (
    `Kernel hibernated${engine}: ${freedMemory(view.freedBytes, view.gpuFreedBytes)} freed, ` +
    `image ${formatBytes(view.imageBytes)}`
  );
}

/**
 * What the user should know about a hibernation besides its sizes: why it did
 * not use CRIU, and which variables its snapshot could not keep.
 */
export function hibernationNotes(view: IKernelView): string[] {
  const notes: string[] = [];
  if (view.fallbackReason) {
    // A CRIU image has one only after a wake fell back to its dill snapshot (and failed).
    notes.push(
      view.engine === 'criu'
        ? view.fallbackReason
        : `Hibernated with ${view.engine || 'dill'}: ${view.fallbackReason}`
    );
  }
  const lost = lostBy(view.engine, view.fallbackReason, view.lost);
  if (lost.length > 0) {
    notes.push(
      `${countVariables(lost)} could not be saved and will be missing after the wake: ` +
        `${formatLost(lost)}`
    );
  }
  return notes;
}

/** Whether the panel offers its Recompute button: a running kernel with cells to run. */
export function canRecompute(view: IKernelView): boolean {
  return view.state === 'running' && (view.recompute?.run.length ?? 0) > 0;
}

/**
 * The plan, one line per lost name: the cells that re-create it with their
 * notebook cell and last run, or why they may not run; then what a run did.
 */
export function recomputeNotes(
  plan: IRecomputePlan | null,
  now: Date
): string[] {
  if (plan === null) {
    return [];
  }
  const cells = new Map(plan.cells.map(cell => [cell.number, cell]));
  const notes = plan.names.map(entry => {
    const runs = entry.cells
      .map(n => cells.get(n))
      .filter((cell): cell is IRecomputeCell => cell !== undefined)
      .map(cell => cellText(cell, now));
    const from = runs.length > 0 ? ` from ${runs.join(', ')}` : '';
    return entry.refused
      ? `${entry.name}: not recomputed${from}: ${entry.refused}`
      : `${entry.name}: can be recomputed${from}`;
  });
  if (plan.recomputed?.length) {
    notes.push(`Recomputed: ${plan.recomputed.join(', ')}`);
  }
  if (plan.failed) {
    notes.push(`Cell [${plan.failed.cell}] failed: ${plan.failed.error}`);
  }
  if (plan.notebook?.changed) {
    notes.push(
      `${plan.notebook.path} changed since the kernel hibernated: the cells run as they ran then`
    );
  }
  return notes;
}

/** `[3] (cell 2, last run 13:52:01)` */
function cellText(cell: IRecomputeCell, now: Date): string {
  const facts: string[] = [];
  if (cell.notebook_cell !== null) {
    facts.push(`cell ${cell.notebook_cell + 1}`);
  }
  if (cell.last_run !== null) {
    const iso = new Date(cell.last_run * 1000).toISOString();
    facts.push(`last run ${formatTime(iso, now)}`);
  }
  return `[${cell.number}]${facts.length > 0 ? ` (${facts.join(', ')})` : ''}`;
}

/**
 * The variables a hibernation really loses: a dill engine's. A CRIU image keeps
 * everything; the dill snapshot kept beside it (keep_dill_snapshot) only
 * counts once the wake has fallen back to it.
 */
function lostBy(
  engine: string | undefined,
  fallbackReason: string | undefined,
  lost: readonly ILostVariable[] | undefined
): readonly ILostVariable[] {
  return engine === 'criu' && !fallbackReason ? [] : (lost ?? []);
}

function countVariables(lost: readonly ILostVariable[]): string {
  return lost.length === 1 ? '1 variable' : `${lost.length} variables`;
}

/** The status bar text for the current notebook's kernel; '' while it simply runs. */
export function statusText(view: IKernelView | undefined): string {
  switch (view?.state) {
    case 'hibernating':
      return 'Hibernating…';
    case 'hibernated':
      return `Hibernated | ${freedShort(view)} freed`;
    case 'waking':
      return 'Waking…';
    default:
      return '';
  }
}

/** A notification to show. */
export interface INotice {
  type: 'success' | 'warning' | 'error';
  message: string;
}

/** `x (socket: cannot be pickled), y (Lock: ...)` */
export function formatLost(lost: readonly ILostVariable[]): string {
  return lost.map(v => `${v.name} (${v.type}: ${v.reason})`).join(', ');
}

/**
 * The notification for an event (null: none, as for the -started actions, which
 * the views show); `kernel` names the kernel for the user.
 */
export function eventNotice(
  event: IHibernationEvent,
  kernel: string
): INotice | null {
  const took =
    event.seconds !== undefined ? ` in ${formatSeconds(event.seconds)}` : '';
  const lost = lostBy(event.engine, event.fallback_reason, event.lost);
  const count = countVariables(lost);
  switch (event.action) {
    case 'hibernate': {
      const fallback = event.fallback_reason
        ? ` Hibernated with ${event.engine || 'dill'}: ${event.fallback_reason}.`
        : '';
      const message =
        `Hibernated ${kernel}${took}: ${freedMemory(event.freed_bytes ?? 0, event.gpu_freed_bytes)} freed, ` +
        `image ${formatBytes(event.image_bytes ?? 0)}.${fallback}`;
      return lost.length === 0
        ? { type: 'success', message }
        : {
            type: 'warning',
            message: `${message} ${count} could not be saved and will be missing after the wake: ${formatLost(lost)}.`
          };
    }
    case 'hibernate-failed':
      return {
        type: 'error',
        message: `Could not hibernate ${kernel}: ${event.error ?? 'unknown error'}`
      };
    case 'wake': {
      // At a wake, a fallback reason is news only if a CRIU image could not be restored.
      const fallback =
        event.fallback_reason && event.engine === 'criu'
          ? ` from its dill snapshot (${event.fallback_reason})`
          : '';
      // recompute = 'auto': what the wake ran again is back.
      const recomputed = event.recompute?.recomputed?.length
        ? `, recomputing ${event.recompute.recomputed.join(', ')}`
        : '';
      return lost.length === 0
        ? {
            type: fallback ? 'warning' : 'success',
            message: `Woke ${kernel}${took}${fallback}${recomputed}.`
          }
        : {
            type: 'warning',
            message:
              `Woke ${kernel}${took}${fallback}${recomputed}, but ${count} ${lost.length === 1 ? 'was' : 'were'} lost: ` +
              `${formatLost(lost)}. ${recomputeHint(event.recompute)}`
          };
    }
    case 'recompute':
      return {
        type: 'success',
        message: `Recomputed in ${kernel}: ${(event.recompute?.recomputed ?? []).join(', ')}.`
      };
    case 'recompute-failed': {
      const failed = event.recompute?.failed;
      return {
        type: 'error',
        message: failed
          ? `Could not recompute in ${kernel}: cell [${failed.cell}] failed: ${failed.error}`
          : `Could not recompute in ${kernel}.`
      };
    }
    case 'wake-failed':
      return {
        type: 'error',
        message: `Could not wake ${kernel}: ${event.error ?? 'unknown error'}`
      };
    case 'hibernate-started':
    case 'wake-started':
    default:
      return null;
  }
}

/** What to do about lost variables: the panel's Recompute button, if the plan has cells to run. */
function recomputeHint(plan: IRecomputePlan | undefined): string {
  return plan && plan.run.length > 0
    ? 'Recompute them from the Kernel Hibernation panel, or run the cells that define them again.'
    : 'Run the cells that define them again.';
}

/** The file names of a kernel's notebooks (or consoles), from its sessions' paths. */
export function sessionNames(paths: readonly string[]): string[] {
  return paths.map(path => path.split('/').pop() || path);
}

/** How a kernel is named to the user: its notebooks' names, else its spec and id. */
export function kernelLabel(
  kernelId: string,
  spec: string,
  paths: readonly string[]
): string {
  if (paths.length > 0) {
    return `the kernel of ${sessionNames(paths).join(', ')}`;
  }
  return `kernel ${spec ? `${spec} ` : ''}${kernelId.slice(0, 8)}`;
}

/** What to tell the user when a hibernate or wake request is refused. */
export interface IRefusal extends INotice {
  /** The kernel is busy: offer to hibernate it anyway (`force`), freezing the cell. */
  offerForce: boolean;
}

/**
 * The failures the server reports on its event stream too (hibernate-failed
 * and wake-failed events), by the `reason` of the refused request.
 */
const REPORTED_BY_EVENTS: readonly string[] = [
  'hibernate-failed',
  'wake-failed',
  'recompute-failed',
  'no-space',
  'store-full'
];

/**
 * The notification for a refused request, or null where the server's event
 * stream reports the failure itself (500, or a reason of `REPORTED_BY_EVENTS`):
 * one notification per failure.
 * What to offer follows the server's `reason` code, never its wording: only
 * `busy` can be forced (`busy-needs-criu` is refused with force too).
 */
export function refusalNotice(
  action: 'hibernate' | 'wake' | 'recompute',
  kernel: string,
  status: number,
  reason: string,
  message: string
): IRefusal | null {
  if (status === 500 || REPORTED_BY_EVENTS.includes(reason)) {
    return null;
  }
  if (action === 'hibernate' && reason === 'busy') {
    return {
      type: 'warning',
      message:
        `${capitalize(kernel)} is busy running a cell. Hibernate it anyway? ` +
        'The cell is frozen and carries on after the wake.',
      offerForce: true
    };
  }
  // 404: the kernel is gone ("no kernel ..."), or the server lacks kernelhib ("Not Found").
  const why =
    message || (status === 404 ? 'it no longer exists' : `error ${status}`);
  return {
    type: status === 409 ? 'warning' : 'error',
    message: `Could not ${action} ${kernel}: ${why}`,
    offerForce: false
  };
}

function capitalize(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** The state column of the panel: `Running (idle)`, `Hibernated`, `Waking…`; `⚠` after a failure. */
export function stateLabel(view: IKernelView): string {
  const warning = view.error ? ' ⚠' : '';
  switch (view.state) {
    case 'running':
      return `Running${view.executionState ? ` (${view.executionState})` : ''}${warning}`;
    case 'hibernating':
      return 'Hibernating…';
    case 'hibernated':
      return `Hibernated${warning}`;
    case 'waking':
      return 'Waking…';
  }
}

/** A time of the server's (ISO 8601): the time of day if it is today, else date and time. */
export function formatTime(iso: string, now: Date): string {
  if (!iso) {
    return '—';
  }
  const time = new Date(iso);
  if (Number.isNaN(time.getTime())) {
    return iso;
  }
  return time.toDateString() === now.toDateString()
    ? time.toLocaleTimeString()
    : time.toLocaleString();
}
