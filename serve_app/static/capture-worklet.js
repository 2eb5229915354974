// AudioWorklet: hands each 128-frame block of the first input channel to the page.
class DiglettCapture extends AudioWorkletProcessor {
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch && ch.length) this.port.postMessage(ch.slice(0));
    return true;
  }
}
registerProcessor("diglett-capture", DiglettCapture);
