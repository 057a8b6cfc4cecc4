/** The hibernation icons, themed like JupyterLab's own (jp-icon3). */
import { LabIcon } from '@jupyterlab/ui-components';

const MOON = 'M6.3 1.6a6.4 6.4 0 1 0 8.1 8.1A5.3 5.3 0 0 1 6.3 1.6z';

/** Offered while the kernel runs: hibernate it. */
export const hibernateIcon = new LabIcon({
  name: 'kernelhib:hibernate',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
  <path class="jp-icon3" fill="none" stroke="#616161" stroke-width="1.3" stroke-linejoin="round" d="${MOON}"/>
</svg>`
});

/** The kernel is hibernated: a full moon with its z's. */
export const hibernatedIcon = new LabIcon({
  name: 'kernelhib:hibernated',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
  <path class="jp-icon3" fill="#616161" d="${MOON}"/>
  <path class="jp-icon3" fill="none" stroke="#616161" stroke-width="1.1" stroke-linejoin="round" d="M10 1.5h3.5L10 5.5h3.5"/>
</svg>`
});

/** Hibernating or waking: the moon half drawn (the button pulses it). */
export const transitionIcon = new LabIcon({
  name: 'kernelhib:transition',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
  <path class="jp-icon3" fill="#616161" fill-opacity="0.45" stroke="#616161" stroke-width="1.1" stroke-linejoin="round" d="${MOON}"/>
</svg>`
});

/** Waking: a rising sun. */
export const wakingIcon = new LabIcon({
  name: 'kernelhib:waking',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
  <circle class="jp-icon3" fill="#616161" cx="8" cy="8" r="3"/>
  <path class="jp-icon3" fill="none" stroke="#616161" stroke-width="1.3" stroke-linecap="round" d="M8 1v2M8 13v2M1 8h2M13 8h2M3 3l1.4 1.4M11.6 11.6L13 13M3 13l1.4-1.4M11.6 4.4L13 3"/>
</svg>`
});
