import type { IHibernationEvent, IKernelModel, IRecomputePlan } from '../state';
import {
  applyEvent,
  beginTransition,
  buttonLook,
  canRecompute,
  eventNotice,
  formatBytes,
  formatSeconds,
  formatTime,
  hibernatedSummary,
  HIBERNATION_SCHEMA,
  HIBERNATION_SCHEMA_0_1,
  hibernationNotes,
  isIdle,
  kernelLabel,
  mergeListing,
  parseHibernationEvent,
  recomputeNotes,
  refusalNotice,
  stateLabel,
  statusText,
  summaryText,
  totalFreed,
  totalInUse,
  viewFromModel
} from '../state';

const ID = 'ed7926aa-1bf2-41c1-812a-935b538f1bf7';
const MiB = 1024 * 1024;

/** The REST model of a hibernated kernel, as docs/rest-api.md shows it. */
const hibernatedModel: IKernelModel = {
  id: ID,
  name: 'python3',
  last_activity: '2026-11-27T00:21:18.049321Z',
  execution_state: 'hibernated',
  connections: 1,
  hibernation: {
    state: 'hibernated',
    engine: 'criu',
    image_bytes: 298 * MiB,
    freed_bytes: 321 * MiB,
    seconds: 0.592,
    hibernated_at: 1795738881.41
  }
};

const runningModel: IKernelModel = {
  id: ID,
  name: 'python3',
  last_activity: '2026-11-27T00:20:00.000000Z',
  execution_state: 'idle',
  connections: 1,
  memory_bytes: 80 * MiB
};

/** Why `auto` used dill, as the server says it. */
const WHY_NOT_CRIU =
  'the kernel was not started by kernelhib-provisioner, so CRIU cannot restore it';

/** A kernel hibernated with dill because CRIU could not be used. */
const dillModel: IKernelModel = {
  ...hibernatedModel,
  hibernation: {
    ...hibernatedModel.hibernation!,
    engine: 'dill',
    fallback_reason: WHY_NOT_CRIU,
    lost: [{ name: 'sock', type: 'socket', reason: 'cannot be pickled' }]
  }
};

function event(fields: Partial<IHibernationEvent>): IHibernationEvent {
  return {
    action: 'hibernate',
    kernel_id: ID,
    state: 'hibernated',
    ...fields
  };
}

describe('viewFromModel', () => {
  it('reads a running kernel without a hibernation object', () => {
    const view = viewFromModel(runningModel);
    expect(view.state).toBe('running');
    expect(view.executionState).toBe('idle');
    expect(view.freedBytes).toBe(0);
    expect(view.memoryBytes).toBe(80 * MiB);
    expect(view.error).toBe('');
  });

  it('reads no memory where the server reports none', () => {
    expect(viewFromModel(hibernatedModel).memoryBytes).toBeNull();
    const { memory_bytes: _, ...older } = runningModel;
    expect(viewFromModel(older).memoryBytes).toBeNull();
  });

  it('reads why CRIU was not used and what dill lost', () => {
    const view = viewFromModel(dillModel);
    expect(view.fallbackReason).toBe(WHY_NOT_CRIU);
    expect(view.lost).toEqual([
      { name: 'sock', type: 'socket', reason: 'cannot be pickled' }
    ]);
    expect(viewFromModel(hibernatedModel)).toMatchObject({
      fallbackReason: '',
      lost: []
    });
  });

  it('reads a hibernated kernel', () => {
    const view = viewFromModel(hibernatedModel);
    expect(view).toMatchObject({
      state: 'hibernated',
      engine: 'criu',
      imageBytes: 298 * MiB,
      freedBytes: 321 * MiB,
      seconds: 0.592,
      executionState: 'hibernated',
      connections: 1
    });
  });

  it('reads a running kernel whose hibernation failed', () => {
    const view = viewFromModel({
      ...runningModel,
      hibernation: { state: 'running', error: 'hibernation failed: boom' }
    });
    expect(view.state).toBe('running');
    expect(view.error).toBe('hibernation failed: boom');
  });
});

describe('parseHibernationEvent', () => {
  it('accepts kernelhib events', () => {
    const emission = {
      schema_id: HIBERNATION_SCHEMA,
      action: 'wake',
      kernel_id: ID,
      state: 'running',
      seconds: 0.4
    };
    expect(parseHibernationEvent(emission)).toBe(emission);
  });

  it("reads events in kernelhib 0.1's schema id, and the new one", () => {
    const base = { action: 'wake', kernel_id: ID, state: 'running' };
    expect(HIBERNATION_SCHEMA).toBe(
      'https://kernelhib.org/events/hibernation/v1'
    );
    const old = { schema_id: HIBERNATION_SCHEMA_0_1, ...base };
    expect(parseHibernationEvent(old)).toBe(old);
    const failed = {
      schema_id: HIBERNATION_SCHEMA,
      ...base,
      action: 'hibernate-failed',
      status: 'error',
      reason: 'no-space'
    };
    expect(parseHibernationEvent(failed)?.reason).toBe('no-space');
  });

  it('ignores other schemas and malformed events', () => {
    const base = {
      schema_id: HIBERNATION_SCHEMA,
      action: 'wake',
      kernel_id: ID,
      state: 'running'
    };
    expect(
      parseHibernationEvent({
        ...base,
        schema_id: 'https://events.jupyter.org/jupyter_server/kernel_actions/v1'
      })
    ).toBeNull();
    expect(parseHibernationEvent({ ...base, action: 42 })).toBeNull();
    expect(parseHibernationEvent({ ...base, state: 'asleep' })).toBeNull();
    expect(parseHibernationEvent({ ...base, kernel_id: 42 })).toBeNull();
  });
});

describe('applyEvent', () => {
  const running = viewFromModel(runningModel);

  it('hibernate-started: hibernating, for every client, without a notification', () => {
    const failedBefore = {
      ...running,
      error: 'hibernation failed: disk full',
      fallbackReason: 'an old reason',
      lost: [{ name: 'x', type: 'int', reason: 'old' }]
    };
    const started = event({
      action: 'hibernate-started',
      state: 'hibernating'
    });
    const view = applyEvent(failedBefore, started);
    expect(view).toMatchObject({
      state: 'hibernating',
      executionState: 'idle',
      memoryBytes: 80 * MiB,
      error: '',
      fallbackReason: '',
      lost: []
    });
    expect(eventNotice(started, 'the kernel of demo.ipynb')).toBeNull();
    // A client that had not seen the kernel yet shows it too.
    expect(applyEvent(undefined, started).state).toBe('hibernating');
  });

  it('wake-started: waking, the image facts kept, without a notification', () => {
    const hibernated = {
      ...viewFromModel(hibernatedModel),
      error: 'wake failed, the image is kept: timeout'
    };
    const started = event({
      action: 'wake-started',
      state: 'waking',
      engine: 'criu',
      freed_bytes: 321 * MiB
    });
    const view = applyEvent(hibernated, started);
    expect(view).toMatchObject({
      state: 'waking',
      engine: 'criu',
      freedBytes: 321 * MiB,
      imageBytes: 298 * MiB,
      error: ''
    });
    expect(eventNotice(started, 'the kernel of demo.ipynb')).toBeNull();
    expect(statusText(view)).toBe('Waking…');
    expect(buttonLook(view).action).toBeNull();
  });

  it('hibernate: the kernel is hibernated, with its sizes', () => {
    const view = applyEvent(
      running,
      event({
        engine: 'criu',
        image_bytes: 10 * MiB,
        freed_bytes: 12 * MiB,
        seconds: 0.5,
        hibernated_at: 100
      })
    );
    expect(view).toMatchObject({
      state: 'hibernated',
      executionState: 'hibernated',
      engine: 'criu',
      imageBytes: 10 * MiB,
      freedBytes: 12 * MiB,
      hibernatedAt: 100,
      memoryBytes: null,
      error: ''
    });
    expect(view.name).toBe('python3');
    expect(view.lastActivity).toBe(runningModel.last_activity);
  });

  it('hibernate-failed: the kernel runs on, with the reason', () => {
    const view = applyEvent(
      beginTransition(running, 'hibernating'),
      event({
        action: 'hibernate-failed',
        state: 'running',
        error: 'hibernation failed, the kernel runs on: no space left'
      })
    );
    expect(view.state).toBe('running');
    expect(view.executionState).toBe('idle');
    expect(view.error).toContain('no space left');
  });

  it('hibernate with dill: why not CRIU, and what was lost', () => {
    const lost = [
      { name: 'gen', type: 'generator', reason: 'cannot be pickled' }
    ];
    const view = applyEvent(
      beginTransition(running, 'hibernating'),
      event({ engine: 'dill', fallback_reason: WHY_NOT_CRIU, lost })
    );
    expect(view).toMatchObject({
      state: 'hibernated',
      engine: 'dill',
      fallbackReason: WHY_NOT_CRIU,
      lost
    });
  });

  it('wake: running again, idle', () => {
    const view = applyEvent(
      viewFromModel(hibernatedModel),
      event({ action: 'wake', state: 'running', seconds: 0.3 })
    );
    expect(view.state).toBe('running');
    expect(view.executionState).toBe('idle');
    expect(view.seconds).toBe(0.3);
    expect(view.error).toBe('');
    // A new process: its memory comes with the next fetch.
    expect(view.memoryBytes).toBeNull();
  });

  it('wake-failed: still hibernated, image kept, with the reason', () => {
    const view = applyEvent(
      beginTransition(viewFromModel(hibernatedModel), 'waking'),
      event({
        action: 'wake-failed',
        state: 'hibernated',
        error: 'wake failed, the image is kept: timeout'
      })
    );
    expect(view.state).toBe('hibernated');
    expect(view.freedBytes).toBe(321 * MiB);
    expect(view.error).toContain('timeout');
  });

  it('an action added later changes the state, without a notification', () => {
    const later = event({ action: 'hibernate-progress', state: 'hibernating' });
    expect(
      parseHibernationEvent({ schema_id: HIBERNATION_SCHEMA, ...later })
    ).not.toBeNull();
    expect(applyEvent(running, later).state).toBe('hibernating');
    expect(eventNotice(later, 'the kernel of demo.ipynb')).toBeNull();
  });

  it('an event about a kernel not seen yet makes its view', () => {
    const view = applyEvent(undefined, event({ freed_bytes: 5 }));
    expect(view.id).toBe(ID);
    expect(view.state).toBe('hibernated');
    expect(view.freedBytes).toBe(5);
  });
});

describe('mergeListing', () => {
  it('keeps known hibernation state, updates activity, adds and drops kernels', () => {
    const known = new Map([[ID, viewFromModel(hibernatedModel)]]);
    const other: IKernelModel = {
      id: 'other',
      name: 'python3',
      execution_state: 'busy'
    };
    const merged = mergeListing(known, [
      {
        ...runningModel,
        last_activity: '2026-11-27T01:00:00Z',
        connections: 2
      },
      other
    ]);
    expect(merged.get(ID)).toMatchObject({
      state: 'hibernated',
      freedBytes: 321 * MiB,
      lastActivity: '2026-11-27T01:00:00Z',
      connections: 2
    });
    expect(merged.get('other')?.state).toBe('running');
    expect(mergeListing(merged, [other]).has(ID)).toBe(false);
  });

  it('takes the memory in use of running kernels from the listing', () => {
    const known = new Map([[ID, viewFromModel(runningModel)]]);
    const merged = mergeListing(known, [
      { ...runningModel, memory_bytes: 90 * MiB }
    ]);
    expect(merged.get(ID)?.memoryBytes).toBe(90 * MiB);
    // A listing without it (a server before memory_bytes) keeps the last known.
    const { memory_bytes: _, ...older } = runningModel;
    expect(mergeListing(merged, [older]).get(ID)?.memoryBytes).toBe(90 * MiB);
    // A listing answered before the hibernation event does not bring it back.
    const hibernated = new Map([[ID, viewFromModel(hibernatedModel)]]);
    expect(mergeListing(hibernated, [runningModel]).get(ID)).toMatchObject({
      state: 'hibernated',
      memoryBytes: null
    });
  });
});

describe('derived values', () => {
  it('isIdle: running and idle only', () => {
    expect(isIdle(viewFromModel(runningModel))).toBe(true);
    expect(
      isIdle(viewFromModel({ ...runningModel, execution_state: 'busy' }))
    ).toBe(false);
    expect(isIdle(viewFromModel(hibernatedModel))).toBe(false);
  });

  it('totalFreed: the memory of hibernated kernels only', () => {
    const hibernated = viewFromModel(hibernatedModel);
    const woken = { ...hibernated, id: 'b', state: 'running' as const };
    expect(totalFreed([hibernated, { ...hibernated, id: 'c' }, woken])).toBe(
      642 * MiB
    );
    expect(totalFreed([])).toBe(0);
  });

  it('totalInUse: the memory of running kernels that report it', () => {
    const running = viewFromModel(runningModel);
    expect(
      totalInUse([
        running,
        { ...running, id: 'b', memoryBytes: null },
        viewFromModel(hibernatedModel)
      ])
    ).toBe(80 * MiB);
  });

  it('summaryText: memory freed, and in use where reported', () => {
    const running = viewFromModel(runningModel);
    const hibernated = viewFromModel(hibernatedModel);
    expect(summaryText([hibernated, running])).toBe(
      'Memory freed: 321.0 MiB, by 1 of 2 kernels; in use: 80.0 MiB'
    );
    expect(summaryText([hibernated])).toBe(
      'Memory freed: 321.0 MiB, by 1 of 1 kernel'
    );
    expect(summaryText([])).toBe('Memory freed: 0 B, by 0 of 0 kernels');
  });
});

describe('formatting', () => {
  it('formats bytes as the CLI does', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(321.1 * MiB)).toBe('321.1 MiB');
    expect(formatBytes(3 * 1024 * MiB)).toBe('3.0 GiB');
    expect(formatBytes(2048 * 1024 * MiB)).toBe('2.0 TiB');
  });

  it('formats durations', () => {
    expect(formatSeconds(0.592)).toBe('0.6 s');
    expect(formatSeconds(75)).toBe('1 min 15 s');
  });

  it('formats times of today and of other days', () => {
    const now = new Date('2026-11-27T12:00:00');
    expect(formatTime('', now)).toBe('—');
    expect(formatTime('garbage', now)).toBe('garbage');
    const today = new Date('2026-11-27T09:30:00');
    expect(formatTime(today.toISOString(), now)).toBe(
      today.toLocaleTimeString()
    );
    const before = new Date('2026-11-20T09:30:00');
    expect(formatTime(before.toISOString(), now)).toBe(before.toLocaleString());
  });

  it('names kernels after their notebooks', () => {
    expect(kernelLabel(ID, 'python3', ['work/demo.ipynb'])).toBe(
      'the kernel of demo.ipynb'
    );
    expect(kernelLabel(ID, 'python3', ['a.ipynb', 'b/c.ipynb'])).toBe(
      'the kernel of a.ipynb, c.ipynb'
    );
    expect(kernelLabel(ID, 'python3', [])).toBe('kernel python3 ed7926aa');
    expect(kernelLabel(ID, '', [])).toBe('kernel ed7926aa');
  });

  it('labels states for the panel', () => {
    expect(stateLabel(viewFromModel(runningModel))).toBe('Running (idle)');
    expect(stateLabel(viewFromModel(hibernatedModel))).toBe('Hibernated');
    const failed = { ...viewFromModel(hibernatedModel), error: 'wake failed' };
    expect(stateLabel(failed)).toBe('Hibernated ⚠');
    expect(stateLabel(beginTransition(failed, 'waking'))).toBe('Waking…');
  });
});

describe('buttonLook', () => {
  const running = viewFromModel(runningModel);
  const hibernated = viewFromModel(hibernatedModel);

  it('offers to hibernate a running kernel, without a label', () => {
    const look = buttonLook(running);
    expect(look).toMatchObject({
      icon: 'hibernate',
      label: '',
      action: 'hibernate'
    });
    expect(look.tooltip).toBe(
      'Hibernate kernel: save it to disk and free its memory (80.0 MiB in use)'
    );
    expect(buttonLook({ ...running, memoryBytes: null }).tooltip).toBe(
      'Hibernate kernel: save it to disk and free its memory'
    );
  });

  it('shows a failed hibernation in the tooltip', () => {
    const look = buttonLook({
      ...running,
      error: 'hibernation failed: disk full'
    });
    expect(look.action).toBe('hibernate');
    expect(look.tooltip).toContain(
      'The last attempt failed: hibernation failed: disk full'
    );
  });

  it('shows hibernated with memory freed and image size, and offers to wake', () => {
    const look = buttonLook(hibernated);
    expect(look).toMatchObject({
      icon: 'hibernated',
      label: 'Hibernated',
      action: 'wake'
    });
    expect(look.tooltip).toContain('321.0 MiB memory freed');
    expect(look.tooltip).toContain('image 298.0 MiB');
    expect(look.tooltip).toContain('(criu)');
    expect(look.tooltip).not.toContain('Hibernated with');
  });

  it('shows why dill was used, and what it could not keep', () => {
    const look = buttonLook(viewFromModel(dillModel));
    expect(look.tooltip).toBe(
      'Kernel hibernated (dill): 321.0 MiB memory freed, image 298.0 MiB\n' +
        `Hibernated with dill: ${WHY_NOT_CRIU}\n` +
        '1 variable could not be saved and will be missing after the wake: ' +
        'sock (socket: cannot be pickled)\n' +
        'Click to wake it, or run a cell.'
    );
  });

  it('shows a failed wake and offers to retry', () => {
    const look = buttonLook({
      ...hibernated,
      error: 'wake failed, the image is kept: x'
    });
    expect(look.action).toBe('wake');
    expect(look.tooltip).toContain('The last wake failed');
  });

  it('disables itself during transitions and without a kernel', () => {
    expect(buttonLook(beginTransition(running, 'hibernating'))).toMatchObject({
      icon: 'hibernating',
      label: 'Hibernating…',
      action: null
    });
    expect(buttonLook(beginTransition(hibernated, 'waking'))).toMatchObject({
      icon: 'waking',
      label: 'Waking…',
      action: null
    });
    expect(buttonLook(undefined).action).toBeNull();
  });
});

describe('hibernationNotes', () => {
  it('says nothing of a plain CRIU hibernation', () => {
    expect(hibernationNotes(viewFromModel(hibernatedModel))).toEqual([]);
  });

  it("ignores the lost variables of a CRIU image's spare dill snapshot", () => {
    const view = {
      ...viewFromModel(hibernatedModel),
      lost: [{ name: 'sock', type: 'socket', reason: 'cannot be pickled' }]
    };
    expect(hibernationNotes(view)).toEqual([]);
  });

  it('says why a CRIU image could not be restored after a failed wake', () => {
    const view = {
      ...viewFromModel(hibernatedModel),
      fallbackReason: 'CRIU could not restore the kernel: libc changed',
      error: 'wake failed, the image is kept: timeout'
    };
    expect(hibernationNotes(view)).toEqual([
      'CRIU could not restore the kernel: libc changed'
    ]);
  });
});

describe('GPU memory', () => {
  /** A CUDA kernel hibernated with dill, as the server reported it on an H200. */
  const gpuModel: IKernelModel = {
    ...hibernatedModel,
    hibernation: {
      ...hibernatedModel.hibernation!,
      engine: 'dill',
      gpu_freed_bytes: 3684 * MiB
    }
  };

  it('shows the GPU memory freed beside the memory', () => {
    const view = viewFromModel(gpuModel);
    expect(view.gpuFreedBytes).toBe(3684 * MiB);
    expect(statusText(view)).toBe('Hibernated | 321.0 MiB + 3.6 GiB GPU freed');
    expect(hibernatedSummary(view)).toBe(
      'Kernel hibernated (dill): 321.0 MiB memory and 3.6 GiB GPU memory freed, image 298.0 MiB'
    );
    const notice = eventNotice(
      event({
        engine: 'dill',
        freed_bytes: 321 * MiB,
        gpu_freed_bytes: 3684 * MiB
      }),
      'the kernel of gpu.ipynb'
    );
    expect(notice?.message).toContain(
      '321.0 MiB memory and 3.6 GiB GPU memory freed'
    );
  });

  it('says nothing of the GPU for a kernel that held none, even after one that did', () => {
    const view = applyEvent(
      viewFromModel(gpuModel),
      event({ freed_bytes: 5 * MiB })
    );
    expect(view.gpuFreedBytes).toBe(0);
    expect(statusText(view)).toBe('Hibernated | 5.0 MiB freed');
  });
});

describe('statusText', () => {
  it('reads Hibernated while hibernated, nothing while running', () => {
    expect(statusText(viewFromModel(hibernatedModel))).toBe(
      'Hibernated | 321.0 MiB freed'
    );
    expect(statusText(viewFromModel(runningModel))).toBe('');
    expect(statusText(undefined)).toBe('');
    expect(
      statusText(beginTransition(viewFromModel(runningModel), 'hibernating'))
    ).toBe('Hibernating…');
    expect(
      statusText(beginTransition(viewFromModel(hibernatedModel), 'waking'))
    ).toBe('Waking…');
  });
});

describe('eventNotice', () => {
  const kernel = 'the kernel of demo.ipynb';

  it('hibernate: success with sizes and time', () => {
    expect(
      eventNotice(
        event({
          freed_bytes: 321 * MiB,
          image_bytes: 298 * MiB,
          seconds: 0.592
        }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message:
        'Hibernated the kernel of demo.ipynb in 0.6 s: 321.0 MiB memory freed, image 298.0 MiB.'
    });
  });

  it('hibernate with dill: says why not CRIU', () => {
    expect(
      eventNotice(
        event({
          engine: 'dill',
          fallback_reason: 'CRIU cannot run here: not root',
          freed_bytes: 12 * MiB,
          image_bytes: 2 * MiB,
          seconds: 1.5
        }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message:
        'Hibernated the kernel of demo.ipynb in 1.5 s: 12.0 MiB memory freed, image 2.0 MiB. ' +
        'Hibernated with dill: CRIU cannot run here: not root.'
    });
  });

  it('hibernate with CRIU and a spare dill snapshot: what the snapshot lacks is not lost', () => {
    const notice = eventNotice(
      event({
        engine: 'criu',
        freed_bytes: MiB,
        image_bytes: MiB,
        lost: [{ name: 'gen', type: 'generator', reason: 'cannot be pickled' }]
      }),
      kernel
    );
    expect(notice?.type).toBe('success');
    expect(notice?.message).not.toContain('gen');
  });

  it('wake from the dill snapshot of a CRIU image: a warning with the reason', () => {
    expect(
      eventNotice(
        event({
          action: 'wake',
          state: 'running',
          engine: 'criu',
          seconds: 2,
          fallback_reason: 'CRIU could not restore the kernel: libc changed'
        }),
        kernel
      )
    ).toEqual({
      type: 'warning',
      message:
        'Woke the kernel of demo.ipynb in 2.0 s from its dill snapshot ' +
        '(CRIU could not restore the kernel: libc changed).'
    });
  });

  it("wake of a dill image: the hibernation's fallback reason is old news", () => {
    expect(
      eventNotice(
        event({
          action: 'wake',
          state: 'running',
          engine: 'dill',
          seconds: 0.4,
          fallback_reason: 'CRIU cannot run here: not root'
        }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message: 'Woke the kernel of demo.ipynb in 0.4 s.'
    });
  });

  it('wake: success', () => {
    expect(
      eventNotice(
        event({ action: 'wake', state: 'running', seconds: 0.4 }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message: 'Woke the kernel of demo.ipynb in 0.4 s.'
    });
  });

  it('wake from a dill snapshot: a warning listing the lost variables', () => {
    const notice = eventNotice(
      event({
        action: 'wake',
        state: 'running',
        lost: [
          { name: 'sock', type: 'socket', reason: 'cannot be pickled' },
          { name: 'lock', type: 'Lock', reason: 'cannot be pickled' }
        ]
      }),
      kernel
    );
    expect(notice?.type).toBe('warning');
    expect(notice?.message).toContain('2 variables were lost');
    expect(notice?.message).toContain('sock (socket: cannot be pickled)');
    expect(notice?.message).toContain('lock (Lock: cannot be pickled)');
  });

  it('hibernate with a dill snapshot that cannot keep everything: a warning', () => {
    const notice = eventNotice(
      event({
        freed_bytes: MiB,
        image_bytes: MiB,
        lost: [{ name: 'gen', type: 'generator', reason: 'cannot be pickled' }]
      }),
      kernel
    );
    expect(notice?.type).toBe('warning');
    expect(notice?.message).toMatch(
      /^Hibernated the kernel of demo.ipynb: 1.0 MiB memory freed/
    );
    expect(notice?.message).toContain(
      '1 variable could not be saved and will be missing after the wake: gen (generator: cannot be pickled).'
    );
  });

  it('failures are errors with the reason', () => {
    expect(
      eventNotice(
        event({
          action: 'hibernate-failed',
          state: 'running',
          error: 'disk full'
        }),
        kernel
      )
    ).toEqual({
      type: 'error',
      message: 'Could not hibernate the kernel of demo.ipynb: disk full'
    });
    expect(
      eventNotice(event({ action: 'wake-failed', error: 'timeout' }), kernel)
        ?.message
    ).toBe('Could not wake the kernel of demo.ipynb: timeout');
  });
});

describe('refusalNotice', () => {
  const kernel = 'the kernel of demo.ipynb';

  it('offers to force a busy kernel', () => {
    const notice = refusalNotice(
      'hibernate',
      kernel,
      409,
      'busy',
      `kernel ${ID} is busy running a cell; hibernate it with force=true`
    );
    expect(notice).toMatchObject({ type: 'warning', offerForce: true });
    expect(notice?.message).toMatch(/^The kernel of demo.ipynb is busy/);
  });

  it('never offers force again where only dill could save the busy kernel', () => {
    const notice = refusalNotice(
      'hibernate',
      kernel,
      409,
      'busy-needs-criu',
      `kernel ${ID} is busy running a cell, and the dill engine can only save a kernel between cells`
    );
    expect(notice).toMatchObject({ type: 'warning', offerForce: false });
    expect(notice?.message).toMatch(/busy running a cell, and the dill engine/);
  });

  it('says why no engine can hibernate', () => {
    expect(
      refusalNotice(
        'hibernate',
        kernel,
        503,
        'no-engine',
        'CRIU cannot run here: not root'
      )
    ).toEqual({
      type: 'error',
      message:
        'Could not hibernate the kernel of demo.ipynb: CRIU cannot run here: not root',
      offerForce: false
    });
  });

  it('handles gone kernels, conflicts and unreachable servers', () => {
    expect(
      refusalNotice('wake', kernel, 404, 'not-found', `no kernel ${ID}`)
        ?.message
    ).toBe(`Could not wake the kernel of demo.ipynb: no kernel ${ID}`);
    expect(refusalNotice('wake', kernel, 404, '', '')?.message).toBe(
      'Could not wake the kernel of demo.ipynb: it no longer exists'
    );
    expect(
      refusalNotice(
        'hibernate',
        kernel,
        409,
        'hibernated',
        `kernel ${ID} is hibernated`
      )
    ).toMatchObject({ type: 'warning', offerForce: false });
    expect(
      refusalNotice('wake', kernel, 0, '', 'the server could not be reached')
        ?.type
    ).toBe('error');
  });

  it('leaves hibernations refused for want of storage to their events', () => {
    for (const reason of ['no-space', 'store-full']) {
      expect(
        refusalNotice('hibernate', kernel, 507, reason, 'not enough free space')
      ).toBeNull();
    }
  });

  it('leaves failed hibernations and wakes to their events', () => {
    expect(
      refusalNotice(
        'hibernate',
        kernel,
        500,
        'hibernate-failed',
        'hibernation failed'
      )
    ).toBeNull();
    expect(
      refusalNotice('wake', kernel, 500, 'wake-failed', 'wake failed')
    ).toBeNull();
  });
});

/** The plan after a dill wake lost `lock` (re-made by cell 3) and `log` (its cell writes a file). */
const plan: IRecomputePlan = {
  names: [
    { name: 'lock', cells: [3] },
    {
      name: 'log',
      cells: [4],
      refused: "cell [4] writes files (open with mode 'w')"
    }
  ],
  cells: [
    {
      number: 3,
      source: 'lock = threading.Lock()',
      last_run: Date.UTC(2026, 10, 27, 0, 20, 0) / 1000,
      notebook_cell: 1
    },
    {
      number: 4,
      source: "log = open('run.log', 'w')",
      last_run: null,
      notebook_cell: null,
      refused: "writes files (open with mode 'w')"
    }
  ],
  run: [3],
  notebook: { path: 'demo.ipynb', fingerprint: 'f00d', changed: false }
};

const wokenWithPlan: IKernelModel = {
  ...runningModel,
  hibernation: { state: 'running', recompute: plan }
};

describe('recompute', () => {
  const now = new Date(Date.UTC(2026, 10, 27, 12, 0, 0));
  const lastRun = new Date(plan.cells[0].last_run! * 1000);
  const lastRunText =
    lastRun.toDateString() === now.toDateString()
      ? lastRun.toLocaleTimeString()
      : lastRun.toLocaleString();

  it('reads the plan of a woken kernel and offers its action', () => {
    const view = viewFromModel(wokenWithPlan);
    expect(view.recompute).toEqual(plan);
    expect(canRecompute(view)).toBe(true);
    expect(viewFromModel(runningModel).recompute).toBeNull();
    expect(canRecompute(viewFromModel(runningModel))).toBe(false);
  });

  it('offers no action while hibernated, or once the cells ran', () => {
    const hibernated = viewFromModel({
      ...hibernatedModel,
      hibernation: { ...hibernatedModel.hibernation!, recompute: plan }
    });
    expect(canRecompute(hibernated)).toBe(false);
    const ran = viewFromModel({
      ...runningModel,
      hibernation: {
        state: 'running',
        recompute: { ...plan, run: [], recomputed: ['lock'] }
      }
    });
    expect(canRecompute(ran)).toBe(false);
  });

  it('lists each lost name with its cells and their last run, or why not', () => {
    expect(recomputeNotes(plan, now)).toEqual([
      `lock: can be recomputed from [3] (cell 2, last run ${lastRunText})`,
      "log: not recomputed from [4]: cell [4] writes files (open with mode 'w')"
    ]);
    expect(recomputeNotes(null, now)).toEqual([]);
  });

  it('says what came back, what failed, and that the notebook changed', () => {
    const after: IRecomputePlan = {
      ...plan,
      names: [plan.names[1]],
      run: [],
      recomputed: ['lock'],
      failed: { cell: 5, error: 'ValueError: boom' },
      notebook: { path: 'demo.ipynb', fingerprint: 'f00d', changed: true }
    };
    expect(recomputeNotes(after, now).slice(1)).toEqual([
      'Recomputed: lock',
      'Cell [5] failed: ValueError: boom',
      'demo.ipynb changed since the kernel hibernated: the cells run as they ran then'
    ]);
  });

  it('keeps the plan through events that do not carry one, drops it at a new hibernation', () => {
    const view = viewFromModel(wokenWithPlan);
    const done = applyEvent(
      view,
      event({
        action: 'recompute',
        state: 'running',
        recompute: { ...plan, run: [], recomputed: ['lock'] }
      })
    );
    expect(done.recompute?.recomputed).toEqual(['lock']);
    expect(canRecompute(done)).toBe(false);
    expect(
      applyEvent(view, event({ action: 'hibernate-started' })).recompute
    ).toBeNull();
  });

  it('notifies the wake with the offer, and the recompute and its failure', () => {
    const kernel = 'the kernel of demo.ipynb';
    const lost = [
      { name: 'lock', type: '_thread.lock', reason: 'thread or lock' }
    ];
    expect(
      eventNotice(
        event({
          action: 'wake',
          state: 'running',
          engine: 'dill',
          lost,
          recompute: plan
        }),
        kernel
      )?.message
    ).toBe(
      'Woke the kernel of demo.ipynb, but 1 variable was lost: lock (_thread.lock: thread or lock). ' +
        'Recompute them from the Kernel Hibernation panel, or run the cells that define them again.'
    );
    expect(
      eventNotice(
        event({
          action: 'wake',
          state: 'running',
          engine: 'dill',
          lost: [],
          recompute: { ...plan, run: [], recomputed: ['lock'] }
        }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message: 'Woke the kernel of demo.ipynb, recomputing lock.'
    });
    expect(
      eventNotice(
        event({
          action: 'recompute',
          state: 'running',
          recompute: { ...plan, recomputed: ['lock'] }
        }),
        kernel
      )
    ).toEqual({
      type: 'success',
      message: 'Recomputed in the kernel of demo.ipynb: lock.'
    });
    expect(
      eventNotice(
        event({
          action: 'recompute-failed',
          state: 'running',
          recompute: { ...plan, failed: { cell: 3, error: 'ValueError: boom' } }
        }),
        kernel
      )
    ).toEqual({
      type: 'error',
      message:
        'Could not recompute in the kernel of demo.ipynb: cell [3] failed: ValueError: boom'
    });
  });

  it('a refused recompute says why; a failed one is left to its event', () => {
    expect(
      refusalNotice(
        'recompute',
        'the kernel of demo.ipynb',
        409,
        'nothing-to-recompute',
        'kernel x has nothing to recompute'
      )
    ).toEqual({
      type: 'warning',
      message:
        'Could not recompute the kernel of demo.ipynb: kernel x has nothing to recompute',
      offerForce: false
    });
    expect(
      refusalNotice(
        'recompute',
        'k',
        500,
        'recompute-failed',
        'cell [3] failed'
      )
    ).toBeNull();
  });
});
