import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { parseCapability } from '../../csi/capabilities';
import { CsiError } from '../../csi/errors';
import type { VolumeCapability__Output } from '../../csi/generated/csi/v1/VolumeCapability';

const capability = (mode: string, access: 'block' | 'mount'): VolumeCapability__Output =>
  ({
    access_mode: { mode },
    access_type: access,
    ...(access === 'block' ? { block: {} } : { mount: { fs_type: '', mount_flags: [], volume_mount_group: '' } }),
  }) as unknown as VolumeCapability__Output;

/** The message of the INVALID_ARGUMENT `fn` throws. */
function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof CsiError, `a CsiError, not ${String(err)}`);
    assert.equal(err.status, grpc.status.INVALID_ARGUMENT);
    return err.message;
  }
  assert.fail('it was accepted');
}

describe('volume capabilities: which access mode Arbor serves with which access type', () => {
  // mode: [multiNode, multiNodeWriter, readOnly] where served; the spec's meaning of each in csi.proto.
  const served = {
    SINGLE_NODE_WRITER: [false, false, false],
    SINGLE_NODE_READER_ONLY: [false, false, true],
    SINGLE_NODE_SINGLE_WRITER: [false, false, false],
    SINGLE_NODE_MULTI_WRITER: [false, false, false],
    MULTI_NODE_READER_ONLY: [true, false, true],
    MULTI_NODE_MULTI_WRITER: [true, true, false],
  } as const;

  for (const [mode, [multiNode, multiNodeWriter, readOnly]] of Object.entries(served)) {
    it(`${mode} is served for Block volumes`, () => {
      const parsed = parseCapability(capability(mode, 'block'));
      assert.deepEqual(
        { mode: parsed.mode, access: parsed.access, multiNode: parsed.multiNode, multiNodeWriter: parsed.multiNodeWriter, readOnly: parsed.readOnly },
        { mode, access: 'block', multiNode, multiNodeWriter, readOnly },
      );
    });
  }

  for (const mode of Object.keys(served).filter((m) => m !== 'MULTI_NODE_MULTI_WRITER')) {
    it(`${mode} is served for Mount volumes`, () => {
      assert.equal(parseCapability(capability(mode, 'mount')).access, 'mount');
    });
  }

  it('MULTI_NODE_MULTI_WRITER is refused for a Mount volume, naming the volume, why, and what to ask for instead', () => {
    const message = refusal(() => parseCapability(capability('MULTI_NODE_MULTI_WRITER', 'mount'), 'volume_capabilities[1]', 'pvc-123'));
    assert.match(message, /^volume pvc-123: volume_capabilities\[1\]: access mode MULTI_NODE_MULTI_WRITER is for Block volumes only/);
    assert.match(message, /not cluster filesystems/);
    assert.match(message, /two nodes mounting one would corrupt it/);
    assert.match(message, /Block volume/);
  });

  it('MULTI_NODE_SINGLE_WRITER is refused for both access types, naming the modes that are served', () => {
    for (const access of ['block', 'mount'] as const) {
      const message = refusal(() => parseCapability(capability('MULTI_NODE_SINGLE_WRITER', access), 'volume_capability', 'vol-0000000000000001'));
      assert.match(message, /volume vol-0000000000000001: volume_capability: access mode MULTI_NODE_SINGLE_WRITER is not supported/);
      assert.match(message, /SINGLE_NODE_WRITER/);
      assert.match(message, /MULTI_NODE_MULTI_WRITER/);
    }
  });

  it('a missing capability, access mode or access type is refused; the volume is named when known', () => {
    assert.match(
      refusal(() => parseCapability(undefined, 'volume_capability', 'data')),
      /^volume data: volume_capability is required/,
    );
    assert.match(
      refusal(() => parseCapability(capability('UNKNOWN', 'block'))),
      /^volume_capability.access_mode is required/,
    );
    assert.match(
      refusal(() => parseCapability({ access_mode: { mode: 'MULTI_NODE_MULTI_WRITER' } } as unknown as VolumeCapability__Output)),
      /access_type is required: block or mount/,
    );
  });
});
