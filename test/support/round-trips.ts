import { Catalog } from '../../store/catalog/catalog';

const counted = new Set<string | symbol>(['get', 'getMany', 'list', 'txn']);

/**
 * Counts the round trips a catalog makes: a call that starts while none is in flight
 * begins one; calls made together (while another is in flight) ride in it. `calls`
 * names every call, for the message of a failing count.
 */
export class RoundTrips {
  trips = 0;
  calls: string[] = [];
  private inFlight = 0;

  /** The catalog, every read and transaction counted. */
  wrap(catalog: Catalog): Catalog {
    return new Proxy(catalog, {
      get: (target, property) => {
        const value: unknown = Reflect.get(target, property, target);
        if (typeof value !== 'function') return value;
        if (!counted.has(property)) return value.bind(target);
        return (...args: unknown[]) => {
          if (this.inFlight++ === 0) this.trips++;
          this.calls.push(String(property));
          const done = () => void this.inFlight--;
          const result = (value as (...a: unknown[]) => Promise<unknown>).apply(target, args);
          result.then(done, done);
          return result;
        };
      },
    });
  }

  /** Runs `fn` and answers how many round trips it took. */
  async during<T>(fn: () => Promise<T>): Promise<{ value: T; trips: number; calls: string[] }> {
    this.trips = 0;
    this.calls = [];
    const value = await fn();
    return { value, trips: this.trips, calls: this.calls };
  }
}
