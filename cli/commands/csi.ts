import * as grpc from '@grpc/grpc-js';
import { csiClient } from '../../csi/client';
import { csiProto } from '../../csi/proto';
import { socketPathOf } from '../../csi/server';
import { ArborError } from '../../store/errors';
import { CommandSpec, UsageError } from '../args';
import { CliContext } from '../context';
import { json } from '../output';

const services = { Identity: 'identity', Controller: 'controller', GroupController: 'group', Node: 'node' } as const;

export const csiCommands: CommandSpec<CliContext>[] = [
  {
    path: ['csi', 'call'],
    positionals: ['SERVICE.METHOD', 'REQUEST?'],
    options: { 'csi-endpoint': { type: 'string', value: 'unix:///PATH', required: true, description: "the plugin's CSI socket" } },
    summary: 'Call a CSI RPC by hand and print the response as JSON, e.g. arbor csi call Controller.CreateVolume \'{"name":"pvc-1", ...}\'.',
    async run(ctx, { positionals: [target, body], values }) {
      const match = /^(Identity|Controller|GroupController|Node)\.([A-Za-z]+)$/.exec(target);
      if (!match)
        throw new UsageError(`${JSON.stringify(target)} is not SERVICE.METHOD (Identity, Controller, GroupController or Node; e.g. Identity.GetPluginInfo)`);
      const definition = csiProto().csi.v1[match[1] as keyof typeof services].service;
      if (!(match[2] in definition)) throw new UsageError(`${match[1]} has no method ${match[2]}; it has ${Object.keys(definition).join(', ')}`);
      let request: object;
      try {
        request = body ? (JSON.parse(body) as object) : {};
      } catch (err) {
        throw new UsageError(`REQUEST is not JSON: ${(err as Error).message}`);
      }
      const client = csiClient(socketPathOf(String(values['csi-endpoint'])));
      try {
        const response = await client[services[match[1] as keyof typeof services]][match[2]](request);
        ctx.stdout.write(json(response));
      } catch (err) {
        const e = err as grpc.ServiceError;
        if (typeof e.code === 'number') throw new ArborError('failed-precondition', `${target}: ${grpc.status[e.code]}: ${e.details}`);
        throw err;
      } finally {
        client.close();
      }
    },
  },
];
