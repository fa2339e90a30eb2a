#!/usr/bin/env node
/**
 * The `arbor` bin, dist/arbor.js: runs the bundled program beside it, from V8's code
 * cache when the one made with it is there (see code-cache.ts).
 */
import { bundleIn, runBundle } from './code-cache';

runBundle(bundleIn(__dirname), true);
