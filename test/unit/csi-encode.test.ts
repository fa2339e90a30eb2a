import assert from 'node:assert/strict';
import { encodeListSnapshotsResponse } from '../../csi/encode';
import type { ListSnapshotsResponse } from '../../csi/generated/csi/v1/ListSnapshotsResponse';
import type { Snapshot } from '../../csi/generated/csi/v1/Snapshot';
import { csiProto } from '../../csi/proto';
import { withEncoders } from '../../csi/server';
import { Random } from '../support/random';

/**
 * csi/encode.ts writes ListSnapshots' response by hand: whatever it writes must read
 * back, through csi.proto's own decoder, as exactly what protobufjs's encoding of the
 * same response reads back as.
 */
describe('the hand-written ListSnapshots encoder', () => {
  const method = csiProto().csi.v1.Controller.service.ListSnapshots;
  const protobufjs = (response: ListSnapshotsResponse): Buffer => method.responseSerialize(response);
  const decoded = (bytes: Buffer) => method.responseDeserialize(bytes);

  const snapshot = (fields: Partial<Snapshot> = {}): Snapshot => ({
    size_bytes: 1 << 30,
    snapshot_id: 'snap-0123456789abcdef',
    source_volume_id: 'vol-fedcba9876543210',
    creation_time: { seconds: 1_796_528_480, nanos: 632_000_000 },
    ready_to_use: true,
    group_snapshot_id: '',
    ...fields,
  });
  const sameAsProtobufjs = (response: ListSnapshotsResponse, what: string) => {
    const mine = encodeListSnapshotsResponse(response);
    assert.ok(mine, `${what}: encoded`);
    assert.deepEqual(decoded(mine), decoded(protobufjs(response)), what);
  };

  it('writes a page as the proto reads it: every field, defaults left out', () => {
    sameAsProtobufjs({ entries: [{ snapshot: snapshot() }], next_token: 'snap-0123456789abcdef' }, 'one snapshot, more to come');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ group_snapshot_id: 'group-0011223344556677' }) }], next_token: '' }, 'in a group, the last page');
    sameAsProtobufjs({ entries: [], next_token: '' }, 'no snapshots');
    sameAsProtobufjs({}, 'nothing set');
    sameAsProtobufjs({ entries: [{ snapshot: null }, {}] }, 'entries without a snapshot');
    sameAsProtobufjs(
      { entries: [{ snapshot: snapshot({ size_bytes: 0, creation_time: { seconds: 0, nanos: 0 }, ready_to_use: false, snapshot_id: '' }) }] },
      'every field at its default',
    );
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ creation_time: null }) }] }, 'no creation time');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ creation_time: { seconds: 12 } }) }] }, 'a creation time without nanos');
  });

  it('writes integers past 32 bits and up to 2^53 - 1 whole', () => {
    for (const size of [127, 128, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 35 + 3, 2 ** 49 + 127, Number.MAX_SAFE_INTEGER]) {
      const response = { entries: [{ snapshot: snapshot({ size_bytes: size, creation_time: { seconds: size, nanos: 999_999_999 } }) }] };
      sameAsProtobufjs(response, `size and seconds ${size}`);
      assert.equal(decoded(encodeListSnapshotsResponse(response)!).entries[0].snapshot!.size_bytes, String(size));
    }
  });

  it('writes strings that are not ASCII, and messages longer than 127 bytes', () => {
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ snapshot_id: 'snap-é', source_volume_id: 'vol-日本', group_snapshot_id: '🌳' }) }] }, 'UTF-8');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ snapshot_id: 'a'.repeat(127) }) }] }, 'an id of 127 bytes');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ snapshot_id: 'a'.repeat(128) }) }] }, 'an id of 128 bytes');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ snapshot_id: 'é'.repeat(100) }) }] }, 'an id of 100 two-byte characters');
    sameAsProtobufjs({ entries: [{ snapshot: snapshot({ source_volume_id: 'v'.repeat(20_000) }) }], next_token: 't'.repeat(300) }, 'a message of 20 KB');
  });

  it('matches protobufjs on seeded random pages, larger than its first buffer', () => {
    const rng = new Random(16);
    const text = (n: number) =>
      Array.from({ length: n }, () =>
        rng.chance(0.05) ? rng.pick(['é', '日', '🌳', '\u0000', '\u007f', '\u0080']) : String.fromCharCode(rng.int(32, 126)),
      ).join('');
    for (let round = 0; round < 20; round++) {
      const entries = Array.from({ length: rng.int(0, 1500) }, () => ({
        snapshot: rng.chance(0.02)
          ? null
          : snapshot({
              size_bytes: rng.pick([0, rng.int(0, 2 ** 31), rng.int(0, 2 ** 20) * 2 ** 30]),
              snapshot_id: text(rng.int(0, 40)),
              source_volume_id: text(rng.pick([0, 20, 130])),
              creation_time: rng.chance(0.1) ? null : { seconds: rng.int(0, 2 ** 34), nanos: rng.int(0, 999_999_999) },
              ready_to_use: rng.chance(0.5),
              group_snapshot_id: rng.chance(0.8) ? '' : text(rng.int(1, 30)),
            }),
      }));
      sameAsProtobufjs({ entries, next_token: rng.chance(0.5) ? '' : text(rng.int(1, 40)) }, `round ${round}`);
    }
  });

  it('leaves values only protobufjs encodes to protobufjs, and the server falls back to it', () => {
    const served = withEncoders('Controller', csiProto().csi.v1.Controller.service).ListSnapshots.responseSerialize;
    const odd: Array<[string, Partial<Snapshot>]> = [
      ['a size as a string', { size_bytes: '1073741824' }],
      ['a negative size', { size_bytes: -1 }],
      ['a fractional size', { size_bytes: 1.5 }],
      ['a size past 2^53', { size_bytes: 2 ** 60 }],
      ['negative seconds', { creation_time: { seconds: -5, nanos: 0 } }],
      ['seconds as a string', { creation_time: { seconds: '5', nanos: 0 } }],
      ['negative nanos', { creation_time: { seconds: 5, nanos: -1 } }],
    ];
    for (const [what, fields] of odd) {
      const response = { entries: [{ snapshot: snapshot(fields) }], next_token: 'x' };
      assert.equal(encodeListSnapshotsResponse(response), undefined, what);
      assert.deepEqual(served(response), protobufjs(response), `${what}: served as protobufjs encodes it`);
    }
    const plain = { entries: [{ snapshot: snapshot() }], next_token: 'x' };
    assert.deepEqual(served(plain), encodeListSnapshotsResponse(plain), 'the server encodes a plain page by hand');
  });
});
