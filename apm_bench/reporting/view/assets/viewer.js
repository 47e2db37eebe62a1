// placeholder: the viewer comes in the front-end commit
window.apmIndex=function(i){window.__apmIndex=i};window.apmChunk=function(n,c){(window.__apmChunks=window.__apmChunks||{})[n]=c};
