/**
 * Commands: Hibernate Kernel and Wake Kernel (the current notebook's kernel,
 * or `args.kernelId`), Hibernate All Idle Kernels, and showing the panel. The
 * settings schema puts the first three in the Kernel menu.
 */
import type { ICommandPalette } from '@jupyterlab/apputils';
import type { INotebookTracker } from '@jupyterlab/notebook';
import type { CommandRegistry } from '@lumino/commands';
import type { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import type { HibernationActions } from './actions';
import { hibernatedIcon, hibernateIcon, wakingIcon } from './icons';
import type { HibernationState } from './state';
import type { HibernationStore } from './store';

export namespace CommandIDs {
  export const hibernate = 'kernelhib:hibernate';
  export const wake = 'kernelhib:wake';
  export const hibernateIdle = 'kernelhib:hibernate-idle';
  export const showPanel = 'kernelhib:show-panel';
}

export interface ICommandContext {
  commands: CommandRegistry;
  tracker: INotebookTracker;
  store: HibernationStore;
  actions: HibernationActions;
  /** Show the sidebar panel. */
  showPanel: () => void;
  palette: ICommandPalette | null;
}

export function addCommands(context: ICommandContext): void {
  const { commands, tracker, store, actions } = context;
  const kernelOf = (args: ReadonlyPartialJSONObject): string | undefined =>
    typeof args.kernelId === 'string'
      ? args.kernelId
      : tracker.currentWidget?.sessionContext.session?.kernel?.id;
  const stateOf = (
    args: ReadonlyPartialJSONObject
  ): HibernationState | undefined => {
    const kernelId = kernelOf(args);
    // A kernel the store has not heard of yet simply runs.
    return kernelId ? (store.view(kernelId)?.state ?? 'running') : undefined;
  };

  commands.addCommand(CommandIDs.hibernate, {
    label: 'Hibernate Kernel',
    caption: 'Save the kernel to disk and free its memory; it wakes intact',
    icon: hibernateIcon,
    isEnabled: args => stateOf(args) === 'running',
    execute: args => {
      const kernelId = kernelOf(args);
      return kernelId ? actions.hibernate(kernelId) : undefined;
    }
  });
  commands.addCommand(CommandIDs.wake, {
    label: 'Wake Kernel',
    caption: 'Restore the hibernated kernel, with all its variables',
    icon: wakingIcon,
    isEnabled: args => stateOf(args) === 'hibernated',
    execute: args => {
      const kernelId = kernelOf(args);
      return kernelId ? actions.wake(kernelId) : undefined;
    }
  });
  commands.addCommand(CommandIDs.hibernateIdle, {
    label: 'Hibernate All Idle Kernels',
    caption: 'Hibernate every running kernel of the server that is idle',
    icon: hibernatedIcon,
    execute: () => actions.hibernateIdle()
  });
  commands.addCommand(CommandIDs.showPanel, {
    label: 'Show Kernel Hibernation Panel',
    caption: 'Every kernel of the server, with its hibernation state',
    execute: () => context.showPanel()
  });

  const update = () => {
    commands.notifyCommandChanged(CommandIDs.hibernate);
    commands.notifyCommandChanged(CommandIDs.wake);
  };
  store.changed.connect(update);
  tracker.currentChanged.connect(update);

  for (const command of Object.values(CommandIDs)) {
    context.palette?.addItem({ command, category: 'Kernel Hibernation' });
  }
}
