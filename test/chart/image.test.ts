/**
 * The Dockerfile cannot be built here (no container runtime), so these tests check
 * what can be checked without one: the packages it installs exist in the base
 * image's Debian release and provide every program the node plugin runs, the entry
 * point runs `arbor`, the runtime has what `arbor` loads at run time and no
 * development dependencies, and the build context leaves out what must not be in it.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { protoPath } from '../../csi/proto';
import { repoRoot } from '../support/helm';
import { controller, defaults, nodePlugin, container } from './rendered';

interface Instruction {
  keyword: string;
  text: string;
}
interface Stage {
  from: string;
  name?: string;
  instructions: Instruction[];
}

/** The Dockerfile's stages, with continuation lines joined and comments dropped. */
function parseDockerfile(text: string): { args: Map<string, string>; stages: Stage[] } {
  const lines: string[] = [];
  let current = '';
  for (const raw of text.split('\n')) {
    if (/^\s*#/.test(raw) && current === '') continue;
    if (/^\s*#/.test(raw)) continue; // a comment inside a continued instruction
    if (raw.endsWith('\\')) {
      current += raw.slice(0, -1) + ' ';
      continue;
    }
    current += raw;
    if (current.trim() !== '') lines.push(current.trim());
    current = '';
  }
  const args = new Map<string, string>();
  const stages: Stage[] = [];
  for (const line of lines) {
    const [, keyword, rest] = /^(\S+)\s+(.*)$/s.exec(line) ?? [];
    const upper = keyword.toUpperCase();
    if (upper === 'FROM') {
      const [, image, name] = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(rest.trim()) ?? [];
      stages.push({ from: image.replace(/^\$\{?(\w+)\}?$/, (_m, arg: string) => args.get(arg) ?? image), name, instructions: [] });
    } else if (upper === 'ARG' && stages.length === 0) {
      const [name, value] = rest.split('=');
      args.set(name.trim(), (value ?? '').trim());
    } else {
      assert.ok(stages.length > 0, `${keyword} before FROM`);
      stages[stages.length - 1].instructions.push({ keyword: upper, text: rest.trim() });
    }
  }
  return { args, stages };
}

const dockerfile = () => parseDockerfile(fs.readFileSync(path.join(repoRoot, 'Dockerfile'), 'utf8'));
const runtime = () => dockerfile().stages.at(-1)!;
const build = () => dockerfile().stages[0];
const runs = (stage: Stage) => stage.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.text);

/** The packages `apt-get install` installs in a stage. */
function aptPackages(stage: Stage): string[] {
  return runs(stage).flatMap((run) =>
    run
      .split(/&&|;/)
      .map((command) => command.trim())
      .filter((command) => /^apt-get\s+install\b/.test(command))
      .flatMap((command) =>
        command
          .split(/\s+/)
          .slice(2)
          .filter((word) => !word.startsWith('-')),
      ),
  );
}

/** COPY instructions of a stage: [from stage or undefined, sources, destination]. */
function copies(stage: Stage): { from?: string; sources: string[]; destination: string }[] {
  return stage.instructions
    .filter((i) => i.keyword === 'COPY')
    .map((i) => {
      const words = i.text.split(/\s+/);
      const from = words[0].startsWith('--from=') ? words.shift()!.slice('--from='.length) : undefined;
      const destination = words.pop()!;
      return { from, sources: words, destination };
    });
}

function workdir(stage: Stage): string {
  const dirs = stage.instructions.filter((i) => i.keyword === 'WORKDIR');
  assert.ok(dirs.length > 0, 'no WORKDIR');
  return dirs[dirs.length - 1].text;
}

/**
 * Every program the node plugin runs on the host, as the code names it:
 * `runner.run('PROGRAM', ...)`, `command: 'PROGRAM'` (mkfs) and the argv it spawns
 * (`['nbdfuse', ...]`).
 */
function programsTheNodePluginRuns(): string[] {
  const sources = fs
    .readdirSync(path.join(repoRoot, 'node-plugin'), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => fs.readFileSync(path.join(repoRoot, 'node-plugin', f), 'utf8'))
    .join('\n');
  const found = new Set<string>();
  for (const pattern of [/\brun\(\s*'([a-z0-9._-]+)'/g, /\bcommand: '([a-z0-9._-]+)'/g, /return \['([a-z0-9._-]+)', /g]) {
    for (const match of sources.matchAll(pattern)) found.add(match[1]);
  }
  return [...found].sort();
}

/**
 * Which Debian package has each program. Where the program is installed on this
 * machine, `dpkg -S` confirms the entry (see the test below).
 */
const debianPackageOf: Record<string, string> = {
  nbdfuse: 'libnbd-bin',
  fusermount3: 'fuse3',
  losetup: 'mount',
  mount: 'mount',
  umount: 'mount',
  blkid: 'util-linux',
  blockdev: 'util-linux',
  findmnt: 'util-linux',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  resize2fs: 'e2fsprogs',
  dumpe2fs: 'e2fsprogs',
  'mkfs.xfs': 'xfsprogs',
  xfs_growfs: 'xfsprogs',
  dd: 'coreutils',
  modprobe: 'kmod',
  tini: 'tini',
};
/** Essential packages every Debian image has. */
const essential = new Set(['coreutils', 'dash', 'util-linux', 'mount']);

function osRelease(): Record<string, string> {
  try {
    return Object.fromEntries(
      fs
        .readFileSync('/etc/os-release', 'utf8')
        .split('\n')
        .filter((l) => l.includes('='))
        .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1).replace(/^"|"$/g, '')]),
    );
  } catch {
    return {};
  }
}

describe('the container image (Dockerfile, .dockerignore)', function () {
  this.timeout(60_000);

  it('builds and runs on the same pinned node:20 Debian bookworm image (better-sqlite3 is native)', () => {
    const { stages } = dockerfile();
    assert.equal(stages.length, 2, 'a build stage and a runtime stage');
    const [image] = new Set(stages.map((s) => s.from));
    assert.equal(new Set(stages.map((s) => s.from)).size, 1, `stages use different images: ${stages.map((s) => s.from).join(', ')}`);
    const match = /^node:(\d+)\.(\d+)\.(\d+)-bookworm-slim$/.exec(image);
    assert.ok(match, `${image} is not a pinned node:X.Y.Z-bookworm-slim`);
    const engines = (JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { engines: { node: string } }).engines.node;
    const [, minMajor, minMinor, maxMajor] = /^>=(\d+)\.(\d+)\s+<(\d+)$/.exec(engines) ?? [];
    const [major, minor] = [Number(match[1]), Number(match[2])];
    assert.ok(
      major >= Number(minMajor) && major < Number(maxMajor) && (major > Number(minMajor) || minor >= Number(minMinor)),
      `${image} does not satisfy engines.node ${engines}`,
    );
  });

  it('installs packages that exist in Debian bookworm', function () {
    // apt-cache answers for the machine's own release, from the package lists `apt-get
    // update` downloads: the test machines are Debian 12 and .ci/run makes sure the lists are there.
    const os = osRelease();
    assert.equal(os.VERSION_CODENAME, 'bookworm', 'this check needs a Debian 12 (bookworm) machine, as the README says');
    const lists = fs.existsSync('/var/lib/apt/lists') ? fs.readdirSync('/var/lib/apt/lists') : [];
    assert.ok(
      lists.some((f) => f.includes('_Packages')),
      'apt has no package lists: run apt-get update',
    );
    const packages = [...aptPackages(build()), ...aptPackages(runtime())];
    assert.ok(packages.length >= 8, packages.join(' '));
    // One apt-cache call for all of them: it prints a record for each package it knows.
    const result = spawnSync('apt-cache', ['show', '--no-all-versions', ...packages], { encoding: 'utf8' });
    const known = new Set([...result.stdout.matchAll(/^Package: (\S+)$/gm)].map((m) => m[1]));
    const missing = packages.filter((name) => !known.has(name));
    assert.deepEqual(missing, [], `not in bookworm's package lists (or run apt-get update): ${missing.join(', ')}`);
  });

  it('installs every program the node plugin runs, and what the chart runs in it', () => {
    const programs = programsTheNodePluginRuns();
    assert.ok(programs.length >= 12, `found only ${programs.join(', ')} in node-plugin/`);
    const installed = new Set([...aptPackages(runtime()), ...essential]);
    for (const program of [...programs, 'modprobe', 'tini']) {
      const pkg = debianPackageOf[program];
      assert.ok(pkg, `node-plugin runs ${program}: add it and its Debian package to this test's table and to the Dockerfile`);
      assert.ok(installed.has(pkg), `${program} needs the Debian package ${pkg}, which the runtime stage does not install`);
    }
    const init = nodePlugin(defaults()).spec.template.spec.initContainers?.[0];
    assert.match(init?.command?.join(' ') ?? '', /modprobe nbd/);
  });

  it('builds the kernel NBD helper with the npm install and ships it in dist/native', () => {
    const stage = build();
    const pkg = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    const script = /^sh (\S+)$/.exec(pkg.scripts.install)?.[1];
    assert.ok(script, `package.json's install script is not 'sh SCRIPT': ${pkg.scripts.install}`);
    assert.match(pkg.scripts.build, new RegExp(`sh ${script.replace(/[.]/g, '\\.')}$`), 'npm run build builds the helper too');
    // npm ci runs the install script: the helper's source must be in the build stage before it.
    const native = path.posix.dirname(script);
    const copyAt = stage.instructions.findIndex((i) => i.keyword === 'COPY' && i.text.split(/\s+/).includes(native));
    const ciAt = stage.instructions.findIndex((i) => i.keyword === 'RUN' && /\bnpm ci\b/.test(i.text));
    assert.ok(copyAt >= 0 && copyAt < ciAt, `the build stage copies ${native} before npm ci`);
    const packages = aptPackages(stage);
    for (const needed of ['gcc', 'libc6-dev']) assert.ok(packages.includes(needed), `the build stage installs ${needed} for the helper`);
    const shipped = copies(runtime()).some((c) => c.from === stage.name && c.sources.includes(path.posix.join(workdir(stage), 'dist')));
    assert.ok(shipped, 'the runtime takes dist (with dist/native) from the build');
    assert.match(runs(runtime()).join('\n'), /test -x \S+\/dist\/native\/arbor-nbd-netlink/, 'the image build proves the helper is there');
  });

  it("names each program's package correctly where this machine can tell (dpkg -S)", () => {
    const candidates = new Map<string, string>();
    for (const program of Object.keys(debianPackageOf)) {
      for (const dir of ['/usr/bin', '/usr/sbin', '/bin', '/sbin']) {
        // Debian registers /bin and /sbin paths for files that live under /usr since the merge.
        if (fs.existsSync(path.join(dir, program))) candidates.set(path.join(dir, program), program);
      }
    }
    const result = spawnSync('dpkg', ['-S', ...candidates.keys()], { encoding: 'utf8' });
    let checked = 0;
    for (const [, owner, file] of result.stdout.matchAll(/^([^:\s]+)(?::\S+)?: (\S+)$/gm)) {
      const program = candidates.get(file);
      if (!program) continue;
      assert.equal(owner, debianPackageOf[program], `${program} (${file}) comes from ${owner}`);
      checked++;
    }
    assert.ok(checked >= 5, `dpkg -S confirmed only ${checked} programs; the test machine has the node plugin's tools installed`);
  });

  it('runs arbor, the package bin, as its entry point, under an init that reaps children', () => {
    const stage = runtime();
    const entry = stage.instructions.filter((i) => i.keyword === 'ENTRYPOINT').at(-1);
    assert.ok(entry, 'no ENTRYPOINT');
    const argv = JSON.parse(entry.text) as string[];
    assert.deepEqual(argv, ['/usr/bin/tini', '--', 'arbor']);
    const pkg = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { bin: Record<string, string>; scripts: Record<string, string> };
    const link = runs(stage)
      .join(' && ')
      .match(/ln -s (\S+) (\S+)/);
    assert.ok(link, 'no symlink puts arbor on PATH');
    assert.equal(link[1], path.posix.join(workdir(stage), pkg.bin.arbor), 'the symlink points at package.json bin.arbor');
    assert.equal(link[2], '/usr/local/bin/arbor');
    assert.match(fs.readFileSync(path.join(repoRoot, 'cli/launcher.ts'), 'utf8'), /^#!\/usr\/bin\/env node\n/, 'the bin runs through its shebang');
    // The bin is the launcher (cli/launcher.ts), bundled with its shebang and made
    // executable; it runs the bundle of cli/main.js beside it, from the code cache the
    // same script writes last.
    assert.match(pkg.scripts.build, /npm run bundle/);
    const bin = pkg.bin.arbor.replace('.', '\\.');
    assert.match(
      pkg.scripts.bundle,
      new RegExp(
        `^esbuild dist/cli/main\\.js --bundle .*--outfile=dist/arbor-main\\.js .*&& esbuild dist/cli/launcher\\.js --bundle .*--outfile=${bin} .*&& chmod \\+x ${bin} && node dist/cli/code-cache\\.js$`,
      ),
    );
    assert.match(fs.readFileSync(path.join(repoRoot, pkg.bin.arbor), 'utf8'), /^#!\/usr\/bin\/env node\n/, 'the built bin starts with the shebang');
    assert.ok((fs.statSync(path.join(repoRoot, pkg.bin.arbor)).mode & 0o111) !== 0, 'the built bin is executable');
    assert.match(runs(stage).join('\n'), /arbor --version/, 'the build proves arbor starts');
    // The chart runs the same entry point: its args start with the arbor command.
    const objects = defaults();
    assert.equal(container(controller(objects).spec.template.spec, 'arbor').args?.[0], 'controller');
    assert.equal(container(nodePlugin(objects).spec.template.spec, 'arbor').args?.[0], 'node');
  });

  it('ships dist, the production node_modules, package.json and the proto arbor loads at run time', () => {
    const stage = runtime();
    const dir = workdir(stage);
    const fromBuild = copies(stage).filter((c) => c.from === build().name);
    const shipped = new Map(
      fromBuild.flatMap((c) => c.sources.map((s) => [path.posix.relative(workdir(build()), s), path.posix.join(dir, c.destination)] as const)),
    );
    for (const item of ['dist', 'node_modules', 'package.json', 'csi/proto'])
      assert.equal(shipped.get(item), path.posix.join(dir, item), `${item} is not copied to ${dir}/${item}`);
    // csi/proto.ts finds the proto relative to its compiled file: the same relative path must hold in the image.
    assert.equal(path.relative(repoRoot, protoPath), 'csi/proto/csi.proto');
    assert.ok(
      copies(stage).every((c) => c.from !== undefined),
      'the runtime copies nothing from the build context',
    );
    assert.ok(!runs(stage).some((r) => /\bnpm (ci|install|i)\b/.test(r)), 'the runtime installs no npm packages');
    const buildRuns = runs(build()).join('\n');
    const buildAt = buildRuns.indexOf('npm run build');
    const pruneAt = buildRuns.indexOf('npm prune --omit=dev');
    assert.ok(buildAt >= 0 && pruneAt > buildAt, 'the build stage prunes the development dependencies after building');
    assert.match(buildRuns, /npm ci\b/, 'the build installs exactly the lock file');
  });

  it('copies into the build every source folder the TypeScript build compiles (but no tests)', () => {
    const tsconfig = JSON.parse(fs.readFileSync(path.join(repoRoot, 'tsconfig.json'), 'utf8')) as { include: string[] };
    const copied = new Set(copies(build()).flatMap((c) => c.sources));
    for (const folder of tsconfig.include.filter((f) => f !== 'test' && f !== 'bench')) {
      assert.ok(copied.has(folder), `the build stage does not copy ${folder}/, which tsconfig.json compiles`);
    }
    for (const file of ['package.json', 'package-lock.json', 'tsconfig.json']) assert.ok(copied.has(file), file);
    assert.ok(!copied.has('test') && !copied.has('bench'));
  });

  it('runs as a non-root user unless the chart asks for root (the node plugin)', () => {
    const users = runtime().instructions.filter((i) => i.keyword === 'USER');
    assert.ok(users.length > 0 && !['root', '0'].includes(users.at(-1)!.text), 'the image runs as root by default');
    const nodeContainer = container(nodePlugin(defaults()).spec.template.spec, 'arbor');
    assert.equal(nodeContainer.securityContext?.runAsUser, 0);
  });

  it('.dockerignore keeps dependencies, build output, git, tests and their data out of the context, and nothing the build copies', () => {
    const patterns = fs
      .readFileSync(path.join(repoRoot, '.dockerignore'), 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '' && !l.startsWith('#'))
      .map((l) => l.replace(/\/$/, ''));
    for (const needed of ['node_modules', 'dist', '.git', 'test', 'arbor-data', '*.state', 'csi/generated'])
      assert.ok(patterns.includes(needed), `.dockerignore lacks ${needed}`);
    const ignored = (file: string) =>
      patterns.some((p) => {
        const regex = new RegExp(`^${p.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*')}(/.*)?$`);
        return regex.test(file);
      });
    for (const { sources } of copies(build()).filter((c) => c.from === undefined)) {
      for (const source of sources) {
        assert.ok(!ignored(source), `.dockerignore excludes ${source}, which the Dockerfile copies`);
        assert.ok(fs.existsSync(path.join(repoRoot, source)), `the Dockerfile copies ${source}, which does not exist`);
      }
    }
  });
});
